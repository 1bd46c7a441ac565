//! Compiling policies: what compiles, what is refused and where, the policy hash, what a policy governs and serves.

use super::*;

#[test]
fn compiled_policies_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CompiledPolicy>();
}

#[test]
fn the_samples_compile() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples");
    for file in ["support-agent.yaml", "deploy-agent.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            if value["kind"] == "AgentPolicy" {
                let policy: AgentPolicy = serde_yaml::from_value(value).unwrap();
                CompiledPolicy::compile(&policy).unwrap_or_else(|e| panic!("{file}: {e}"));
            }
        }
    }
    use serde::Deserialize;
}

#[test]
fn compile_reports_every_problem_with_its_path() {
    let errors = policy_with(json!({
        "upstreams": [{"name": "crm"}, {"name": "crm"}],
        "tools": {
            "allowed": [
                {"name": "a", "upstream": "billing"},
                {"name": "b", "irreversible": true},
                {"name": "c", "arguments": {"fields": {"x": {"type": "integer", "pattern": "("}}}},
                {"name": "d", "when": "args.x ==", "autonomy": "Gated"},
                {"name": "e", "limits": {"maxItemsPerRun": {"field": "ids", "max": 0}}},
                {"name": "bad name"},
                {"name": "blocked_too"}
            ],
            "blocked": ["blocked_too"]
        },
        "execution": {"maxSteps": 0, "maxCostUSD": "-1", "perIdentity": {"window": "1d"}},
        "kubernetes": {"freezeWindows": [{"start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"}]}
    }))
    .unwrap_err();
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "spec.upstreams[1].name",
        "spec.tools.allowed[0].upstream",
        "spec.tools.allowed[1].approval",
        "spec.tools.allowed[2].arguments.fields.x.pattern",
        "spec.tools.allowed[3].when",
        "spec.tools.allowed[3].autonomy",
        "spec.tools.allowed[4].limits.maxItemsPerRun.field",
        "spec.tools.allowed[4].limits.maxItemsPerRun.max",
        "spec.tools.allowed[5].name",
        "spec.tools.allowed[6].name",
        "spec.execution.maxSteps",
        "spec.execution.maxCostUSD",
        "spec.execution.perIdentity.window",
        "spec.kubernetes.freezeWindows[0].end",
    ] {
        assert!(
            paths.contains(&expected),
            "no error at {expected}; got:\n{errors}"
        );
    }
    assert!(
        errors
            .0
            .iter()
            .all(|e| !e.message.is_empty() && !e.hint.is_empty())
    );
    assert!(
        errors.to_string().contains("invalid regular expression"),
        "{errors}"
    );
}

#[test]
fn the_policy_hash_follows_the_spec_and_nothing_else() {
    let a = tools(json!([{"name": "read"}]));
    let b = tools(json!([{"name": "read"}]));
    let c = tools(json!([{"name": "read2"}]));
    assert_eq!(a.hash(), b.hash());
    assert_ne!(a.hash(), c.hash());
    assert!(a.hash().starts_with("sha256:"));
}

#[test]
fn a_policy_governs_its_identity_in_its_namespace_only() {
    let p = policy(json!({}));
    assert!(p.governs("ns/support"));
    assert!(!p.governs("other/support"));
    assert!(!p.governs("ns/support2"));
    assert!(!p.governs("support"));
    assert!(!p.governs("ns/support/x"));
}

#[test]
fn an_mcp_upstream_serves_only_allowed_tools_it_hosts() {
    let policy = policy_with(json!({
        "upstreams": [{"name": "crm"}, {"name": "billing"}],
        "tools": {"allowed": [
            {"name": "lookup", "upstream": "crm"},
            {"name": "charge", "upstream": "billing"},
            {"name": "anywhere"}
        ], "blocked": ["drop"]}
    }))
    .unwrap();
    assert!(policy.serves_through("lookup", "crm"));
    assert!(!policy.serves_through("lookup", "billing"));
    assert!(!policy.serves_through("charge", "crm"));
    assert!(policy.serves_through("anywhere", "crm"));
    assert!(!policy.serves_through("drop", "crm"));
    assert!(!policy.serves_through("unknown", "crm"));
}

#[test]
fn an_mcp_upstream_is_a_url_or_a_stdio_command_each_well_formed() {
    let errors = policy_with(json!({
        "upstreams": [
            {"name": "both", "mcp": {"url": "http://x/mcp", "stdio": {"command": "srv"}}},
            {"name": "neither", "mcp": {}},
            {"name": "ftp", "mcp": {"url": "ftp://x/mcp", "timeoutSeconds": 0}},
            {"name": "blank", "mcp": {"stdio": {"command": " "}}},
            {"name": "names", "mcp": {"stdio": {"command": "srv", "env": {"1X": "v", "OK": "a\u{0}b"},
                                                 "credentialEnv": "OK"}}},
            {"name": "fine", "mcp": {"stdio": {"command": "npx", "args": ["-y", "server"],
                                                "env": {"MODE": "read"}, "credentialEnv": "TOKEN"}}}
        ]
    }))
    .unwrap_err();
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "spec.upstreams[0].mcp",
        "spec.upstreams[1].mcp",
        "spec.upstreams[2].mcp.url",
        "spec.upstreams[2].mcp.timeoutSeconds",
        "spec.upstreams[3].mcp.stdio.command",
        "spec.upstreams[4].mcp.stdio.env[1X]",
        "spec.upstreams[4].mcp.stdio.env[OK]",
        "spec.upstreams[4].mcp.stdio.credentialEnv",
    ] {
        assert!(
            paths.contains(&expected),
            "no error at {expected}; got:\n{errors}"
        );
    }
    assert!(
        paths.iter().all(|p| !p.starts_with("spec.upstreams[5]")),
        "a well-formed stdio upstream is accepted: {errors}"
    );
}

#[test]
fn a_server_may_ask_the_client_only_what_its_upstream_names() {
    let policy = policy_with(json!({
        "upstreams": [
            {"name": "tickets", "mcp": {"url": "http://tickets/mcp",
                                        "serverRequests": ["Sampling", "Elicitation", "Elicitation"]}},
            {"name": "crm", "mcp": {"url": "http://crm/mcp"}}]
    }))
    .unwrap();
    assert!(policy.lets_server_ask("tickets", "elicitation/create"));
    assert!(policy.lets_server_ask("tickets", "sampling/createMessage"));
    for (upstream, method) in [
        ("tickets", "roots/list"),
        ("tickets", "Elicitation/Create"),
        ("tickets", "tools/call"),
        ("crm", "elicitation/create"),
        ("nowhere", "sampling/createMessage"),
    ] {
        assert!(
            !policy.lets_server_ask(upstream, method),
            "{upstream} {method}"
        );
    }
    use tollgate_crds::policy::ServerRequest;
    assert_eq!(
        policy.server_requests("tickets"),
        [ServerRequest::Elicitation, ServerRequest::Sampling]
    );
    assert!(policy.server_requests("crm").is_empty());
    // An unknown kind never reaches the engine: the policy does not parse, and says why.
    let unknown = serde_json::from_value::<tollgate_crds::policy::McpUpstream>(
        json!({"url": "http://t/mcp", "serverRequests": ["Everything"]}),
    )
    .unwrap_err()
    .to_string();
    assert!(
        unknown.contains("unknown variant `Everything`, expected one of `Elicitation`"),
        "{unknown}"
    );
}

#[test]
fn resources_and_prompts_are_read_only_as_listed_and_never_past_a_prefix() {
    let policy = policy_with(json!({
        "upstreams": [{"name": "docs", "mcp": {"url": "http://docs/mcp"}},
                      {"name": "crm", "mcp": {"url": "http://crm/mcp"}}],
        "resources": {"allowed": [{"upstream": "docs",
                                   "uris": ["docs://handbook/*", "docs://index.md"]}]},
        "prompts": {"allowed": [{"upstream": "docs", "names": ["summarize"]}]}
    }))
    .unwrap();
    assert_eq!(
        policy.reads_resource("docs", "docs://handbook/leave.md"),
        Some("spec.resources.allowed[0].uris[0]")
    );
    assert_eq!(
        policy.reads_resource("docs", "docs://index.md"),
        Some("spec.resources.allowed[0].uris[1]")
    );
    for denied in [
        "docs://index.md2",
        "docs://handbook/../secrets.md",
        "docs://handbook/%2e%2e/secrets.md",
        "docs://handbook/%2E%2E%2fsecrets.md",
        "docs://handbook/a%2f..%2fsecrets.md",
        "docs://other.md",
    ] {
        assert_eq!(policy.reads_resource("docs", denied), None, "{denied}");
    }
    assert_eq!(policy.reads_resource("crm", "docs://index.md"), None);
    assert!(policy.offers_resources("docs") && !policy.offers_resources("crm"));
    assert!(policy.serves_template("docs", "docs://handbook/{page}"));
    assert!(!policy.serves_template("docs", "docs://{path}"));
    assert!(policy.gets_prompt("docs", "summarize"));
    assert!(!policy.gets_prompt("docs", "Summarize") && !policy.gets_prompt("crm", "summarize"));
    assert!(policy.offers_prompts("docs") && !policy.offers_prompts("crm"));

    let errors = policy_with(json!({
        "upstreams": [{"name": "docs", "mcp": {"url": "http://docs/mcp"}},
                      {"name": "models", "llm": {"api": "OpenAI", "url": "https://x", "models": ["m"]}}],
        "resources": {"allowed": [{"upstream": "models", "uris": ["x://*"]},
                                  {"upstream": "docs", "uris": ["a*b", "docs://x/../*", "*"]}]},
        "prompts": {"allowed": [{"upstream": "nowhere", "names": ["p"]},
                                {"upstream": "docs", "names": [""]}]}
    }))
    .unwrap_err();
    let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "spec.resources.allowed[0].upstream",
        "spec.resources.allowed[1].uris[0]",
        "spec.resources.allowed[1].uris[1]",
        "spec.resources.allowed[1].uris[2]",
        "spec.prompts.allowed[0].upstream",
        "spec.prompts.allowed[1].names",
    ] {
        assert!(
            paths.contains(&expected),
            "no error at {expected}; got:\n{errors}"
        );
    }
}
