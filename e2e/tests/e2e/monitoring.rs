//! What operators watch: the chart's alert rules checked and unit-tested by promtool, and every
//! query of the Grafana dashboard evaluated by a real Prometheus (both built from the module
//! pinned in `e2e/prometheus`) that scraped Tollgate at work: the standalone gateway running the
//! README's sample agent, and the operator and admission webhook on the control plane, with an
//! approval decided by a person.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::api::Api;
use serde_json::{Value, json};
use tollgate_crds::ApprovalRequest;
use tollgate_e2e::operator::{Operator, Options};
use tollgate_e2e::{control_plane, eventually, repo_root};
use tollgate_runtime::cluster::WatchedView;

use crate::gateway::{alice_approves, email, gateway_over, post_decide, sample_agent};

/// The directory of the Prometheus and promtool binaries (`e2e/prometheus/build.sh`, run by
/// `e2e/prepare.sh`; a second run only prints the directory).
fn prometheus_bin() -> PathBuf {
    let script = repo_root().join("e2e/prometheus/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "{} failed", script.display());
    let stdout = String::from_utf8(output.stdout).unwrap();
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build.sh printed no directory"),
    )
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chart_file(name: &str) -> PathBuf {
    repo_root().join("charts/tollgate/files").join(name)
}

#[test]
fn the_alert_rules_pass_promtool_and_each_alert_has_a_unit_test_and_a_runbook() {
    let promtool = prometheus_bin().join("promtool");
    for args in [vec!["check", "rules"], vec!["test", "rules"]] {
        let file = if args[0] == "check" {
            "alerts.yaml"
        } else {
            "alerts_test.yaml"
        };
        let output = Command::new(&promtool)
            .args(&args)
            .arg(chart_file(file))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?} {file}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_file("alerts.yaml")).unwrap()).unwrap();
    let tests = std::fs::read_to_string(chart_file("alerts_test.yaml")).unwrap();
    let runbooks = std::fs::read_to_string(repo_root().join("docs/runbooks.md")).unwrap();
    let alerts: Vec<&str> = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(alerts.len(), 7, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
        assert!(
            runbooks.contains(&format!("## {alert}\n")),
            "{alert} has no runbook section"
        );
    }
}

/// The sample agent's traffic through the standalone gateway of this build, on `port`, its fake
/// provider on `llm`; returns the gateway process.
fn standalone_with_traffic(dir: &Path, port: u16, llm: u16) -> (Killed, Killed) {
    let bin = std::env::current_exe().unwrap();
    let bin = bin.parent().unwrap().parent().unwrap();
    let policies = dir.join("policies");
    std::fs::create_dir(&policies).unwrap();
    for entry in std::fs::read_dir(repo_root().join("config/samples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("127.0.0.1:8490", &format!("127.0.0.1:{llm}"));
            std::fs::write(policies.join(path.file_name().unwrap()), text).unwrap();
        }
    }
    let audit = dir.join("audit.db");
    let gateway = Killed(
        Command::new(bin.join("tollgate-gateway"))
            .current_dir(repo_root())
            .args(["standalone", "--policies"])
            .arg(&policies)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("TOLLGATE_AUDIT_STORE", &audit)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the gateway binary of this build (cargo build -p tollgate-gateway)"),
    );
    let fake = Killed(
        Command::new(bin.join("examples/fake-llm"))
            .arg(format!("127.0.0.1:{llm}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the fake provider of this build (cargo build -p tollgate-gateway --examples)"),
    );
    (gateway, fake)
}

#[tokio::test]
async fn every_dashboard_query_returns_data_from_a_prometheus_that_scraped_tollgate_at_work() {
    let cp = control_plane();
    let webhook_probe = tollgate_e2e::admission::webhook();
    let (ns, token) = sample_agent("monitoring").await;
    let operator = Operator::start(&ns, Options::default());
    let dir = tempfile::tempdir().unwrap();
    let free = || tollgate_testkit::free_port().unwrap();
    let (gateway_port, llm_port, prometheus_port) = (free(), free(), free());
    let (_gateway, _fake) = standalone_with_traffic(dir.path(), gateway_port, llm_port);

    // A Prometheus scraping the three, every second.
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: tollgate-gateway
    static_configs: [{{targets: ['127.0.0.1:{gateway_port}']}}]
  - job_name: tollgate-operator
    static_configs: [{{targets: ['127.0.0.1:{}']}}]
  - job_name: tollgate-webhook
    static_configs: [{{targets: ['127.0.0.1:{webhook_probe}']}}]
",
            operator.probe()
        ),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new(prometheus_bin().join("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{prometheus_port}");
    eventually(
        "Prometheus to be ready",
        Duration::from_secs(60),
        || async {
            let ready = http.get(format!("{api}/-/ready")).send().await.ok()?;
            ready.status().is_success().then_some(())
        },
    )
    .await;

    // Tollgate at work while it is scraped: the README's sample agent (decisions, refusals, an
    // approval, a halt, model calls), and on the control plane an approval alice decides.
    let bin = std::env::current_exe().unwrap();
    let bin = bin.parent().unwrap().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = Command::new("bash")
        .arg("examples/sample-agent.sh")
        .current_dir(repo_root())
        .env("PATH", path)
        .env("TOLLGATE_URL", format!("http://127.0.0.1:{gateway_port}"))
        .env("TOLLGATE_FAKE_LLM", format!("127.0.0.1:{llm_port}"))
        .env("TOLLGATE_AUDIT_STORE", dir.path().join("audit.db"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        script.status.success(),
        "{}",
        String::from_utf8_lossy(&script.stderr)
    );
    let view = WatchedView::start(
        cp.client(tollgate_e2e::User::Admin).await,
        "tollgate-system",
    );
    view.ready().await;
    let (url, _store, _trail) = gateway_over(std::sync::Arc::new(view), "gw-monitoring").await;
    let (status, asked) = post_decide(
        &reqwest::Client::new(),
        &url,
        &token,
        json!({"runId": "m-1", "tool": "send_customer_email", "arguments": email("watched"),
               "wait": false}),
    )
    .await;
    assert_eq!(status, 202, "{asked}");
    let name = asked["approvalRequest"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    alice_approves(&ns, &name, "ok").await;
    let requests: Api<ApprovalRequest> =
        Api::namespaced(cp.client(tollgate_e2e::User::Admin).await, &ns);
    eventually(
        "the operator settles the request",
        Duration::from_secs(30),
        || async {
            let request = requests.get(&name).await.ok()?;
            (request.status?.phase == tollgate_crds::approval::Phase::Approved).then_some(())
        },
    )
    .await;

    // Every query of every panel, with the dashboard's variables at "All", returns data.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(chart_file("dashboard.json")).unwrap())
            .unwrap();
    let queries: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap().to_owned();
            panel["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_owned()))
        })
        .collect();
    assert!(queries.len() >= 16, "{}", queries.len());
    let mut missing = Vec::new();
    let started = std::time::Instant::now();
    loop {
        missing.clear();
        for (title, expr) in &queries {
            let query = expr
                .replace("$__rate_interval", "1m")
                .replace("$namespace", ".*")
                .replace("$agent", ".*");
            let answer: Value = http
                .get(format!("{api}/api/v1/query"))
                .query(&[("query", query.as_str())])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(answer["status"], "success", "{title}: {query}: {answer}");
            if answer["data"]["result"]
                .as_array()
                .is_none_or(Vec::is_empty)
            {
                missing.push(format!("{title}: {query}"));
            }
        }
        if missing.is_empty() || started.elapsed() > Duration::from_secs(40) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        missing.is_empty(),
        "queries without data:\n{}",
        missing.join("\n")
    );
    operator.stop().unwrap();
}
