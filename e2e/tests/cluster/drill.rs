//! Kill-switch drills on the node: `kubectl tollgate kill` on the support agent (and `kill --all`
//! for the global switch), then the time until each plane holds, and `unkill` until each lets the
//! agent through again. The figures go to bench/README.md's kill-switch table; the assertions are
//! that every plane holds, and lets go, within the drill's bound.
//!
//! Planes, each probed every 20 ms from where the agent stands:
//! - gateway: a tool call with the agent's gateway token is refused (`KillSwitch`);
//! - RBAC: the agent's apiserver token may no longer read ConfigMaps (its RoleBinding is gone);
//! - network: a connection from the agent's pod to the gateway no longer opens (the
//!   NetworkPolicy denies all egress), timed inside the pod by `e2e-agent until`;
//! - admission: a write the agent is still allowed by a binding Tollgate does not manage (a
//!   platform team's) is refused by admission.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tollgate_e2e::User;

use crate::agents::{AGENT, AGENT_POD, NS, support};
use crate::support::{self, SYSTEM, Test, kubectl, tollgate};

pub fn tests() -> Vec<Test> {
    vec![Test {
        name: "kill_switch_drills_hold_on_every_plane_and_release_restores_each",
        run: kill_switch_drills_hold_on_every_plane_and_release_restores_each,
    }]
}

/// Drills of each switch, p50 and p99 over these: 5, or `TOLLGATE_E2E_DRILLS` (bench/README.md's
/// figures come from 20).
fn drills() -> usize {
    std::env::var("TOLLGATE_E2E_DRILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5)
}
/// How long any plane may take to hold or to let go.
const BOUND: Duration = Duration::from_secs(30);
const PLANES: [&str; 5] = [
    "gateway",
    "RBAC",
    "network",
    "admission",
    "(floor: the kubectl tollgate process itself)",
];

/// What the admission probe last saw, for the message when it does not change in time.
static LAST_ADMISSION: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Releases both switches when a drill fails, so that the tests after it find Tollgate as it was.
struct Released;

impl Drop for Released {
    fn drop(&mut self) {
        let _ = tollgate(User::Admin, &["unkill", AGENT, "-n", NS]);
        let _ = tollgate(User::Admin, &["unkill", "--all"]);
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

struct Probes {
    http: reqwest::Client,
    /// The agent's token for the gateway (audience tollgate) and for the apiserver.
    gateway_token: String,
    apiserver_token: String,
    gateway: String,
    apiserver: String,
}

fn probes() -> &'static Probes {
    static PROBES: OnceLock<Probes> = OnceLock::new();
    PROBES.get_or_init(|| {
        support();
        let cp = support::node().control_plane();
        // A binding Tollgate does not manage: the agent may create ConfigMaps whatever its switch
        // says, so that only admission stands between a killed agent and that write.
        crate::agents::platform_writer();
        let token = |audience: &[&str]| {
            let mut args = vec!["create", "token", "-n", NS];
            let sa = format!("agent-{AGENT}");
            args.push(&sa);
            args.extend_from_slice(audience);
            kubectl(&args).trim().to_owned()
        };
        let gateway_ip = kubectl(&[
            "-n",
            SYSTEM,
            "get",
            "service",
            "tollgate-gateway",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]);
        let ca = support::gateway_ca();
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD
            .decode(ca.trim())
            .unwrap();
        let host = format!("tollgate-gateway.{SYSTEM}.svc");
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(cp.ca_pem().as_bytes()).unwrap())
            .resolve(
                &host,
                SocketAddr::new(gateway_ip.trim().parse().unwrap(), 8443),
            )
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        Probes {
            http,
            gateway_token: token(&["--audience", "tollgate"]),
            apiserver_token: token(&[]),
            gateway: format!("https://{host}:8443"),
            apiserver: cp.server().to_owned(),
        }
    })
}

impl Probes {
    /// Whether the gateway refuses the agent's call because of a kill switch.
    async fn gateway_refuses(&self, run: &str) -> bool {
        let answer = self
            .http
            .post(format!("{}/v1/decide", self.gateway))
            .bearer_auth(&self.gateway_token)
            .json(&json!({"runId": run, "tool": "read_customer_record", "arguments": {"customer_id": "C000042"}}))
            .send()
            .await;
        let Ok(answer) = answer else { return false };
        let body: Value = answer.json().await.unwrap_or_default();
        body["code"] == "KillSwitch"
    }

    /// Whether the apiserver refuses the agent's read (RBAC).
    async fn rbac_refuses(&self) -> bool {
        let answer = self
            .http
            .get(format!(
                "{}/api/v1/namespaces/{NS}/configmaps",
                self.apiserver
            ))
            .bearer_auth(&self.apiserver_token)
            .send()
            .await;
        answer.is_ok_and(|a| a.status() == 403)
    }

    /// Whether admission refuses the agent's write (a dry run: nothing is created).
    async fn admission_refuses(&self) -> bool {
        let (refused, detail) = self.admission().await;
        *LAST_ADMISSION.lock().unwrap() = detail;
        refused
    }

    async fn admission(&self) -> (bool, String) {
        let answer = self
            .http
            .post(format!(
                "{}/api/v1/namespaces/{NS}/configmaps?dryRun=All",
                self.apiserver
            ))
            .bearer_auth(&self.apiserver_token)
            .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "drill"}}))
            .send()
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => return (false, e.to_string()),
        };
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        (
            status == 403 && text.contains("admission webhook") && text.contains("kill switch"),
            format!("{status} {text}"),
        )
    }
}

/// Polls `probe` every 20 ms until it returns `want`; the time it took from `start_ms`.
async fn until(
    what: &str,
    want: bool,
    start_ms: u128,
    mut probe: impl AsyncFnMut() -> bool,
) -> u128 {
    loop {
        if probe().await == want {
            return now_ms() - start_ms;
        }
        assert!(
            now_ms() - start_ms < BOUND.as_millis(),
            "{what} did not {} within {}s (admission last answered: {})",
            if want { "hold" } else { "let go" },
            BOUND.as_secs(),
            LAST_ADMISSION.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `e2e-agent until` in the agent's pod: waits until a connection to the gateway opens (or no
/// longer does) and prints the unix time in ms when it saw it.
fn network_watch(connected: bool) -> Child {
    support::node()
        .control_plane()
        .kubectl(User::Admin)
        .args([
            "exec",
            "-n",
            NS,
            AGENT_POD,
            "--",
            "/usr/local/bin/e2e-agent",
            "until",
        ])
        .arg(format!("tollgate-gateway.{SYSTEM}.svc:8443"))
        .arg(if connected {
            "--connected"
        } else {
            "--refused"
        })
        .arg(format!("--timeout-ms={}", BOUND.as_millis()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn network_seen(child: Child, start_ms: u128) -> u128 {
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the network plane did not change within {}s: {text}{}",
        BOUND.as_secs(),
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: u128 = text.trim().parse().unwrap_or_else(|_| panic!("{text}"));
    seen.saturating_sub(start_ms)
}

/// One drill: engage, measure each plane until it holds, release, measure until each lets go.
/// Returns the milliseconds per plane, engage then release, and last the time the command itself
/// took (the floor: the switch is an apiserver write by then).
fn drill(rt: &tokio::runtime::Runtime, global: bool, n: usize) -> ([u128; 5], [u128; 5]) {
    let probes = probes();
    let switch = move |engage: bool| {
        let verb = if engage { "kill" } else { "unkill" };
        let mut args = vec![verb];
        if global {
            args.push("--all");
        } else {
            args.extend([AGENT, "-n", NS]);
        }
        args.extend(["--reason", "kill-switch drill"]);
        let output = tollgate(User::Admin, &args);
        assert!(
            output.status.success(),
            "kubectl tollgate {verb}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let run = format!("drill-{global}-{n}");
    let mut times = ([0; 5], [0; 5]);
    for engage in [true, false] {
        // The network watch starts first and must see the state change after the switch moved.
        let watch = network_watch(!engage);
        std::thread::sleep(Duration::from_millis(300));
        let start = now_ms();
        let (gateway, rbac, admission, command) = rt.block_on(async {
            let command = async {
                // The plugin on a thread of its own, while the probes run.
                tokio::task::spawn_blocking(move || {
                    switch(engage);
                    now_ms() - start
                })
                .await
                .unwrap()
            };
            tokio::join!(
                until("the gateway", engage, start, async || probes
                    .gateway_refuses(&run)
                    .await),
                until("RBAC", engage, start, async || probes.rbac_refuses().await),
                until("admission", engage, start, async || probes
                    .admission_refuses()
                    .await),
                command,
            )
        });
        let network = network_seen(watch, start);
        let slot = if engage { &mut times.0 } else { &mut times.1 };
        *slot = [gateway, rbac, network, admission, command];
    }
    times
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn kill_switch_drills_hold_on_every_plane_and_release_restores_each() {
    probes();
    let _released = Released;
    // Before any drill every plane lets the agent through. One runtime for every probe: the
    // client's pooled connections belong to the runtime that opened them.
    let rt = support::runtime();
    rt.block_on(async {
        let p = probes();
        assert!(
            !p.gateway_refuses("drill-before").await,
            "the gateway refuses before any switch"
        );
        assert!(!p.rbac_refuses().await, "RBAC refuses before any switch");
        assert!(
            !p.admission_refuses().await,
            "admission refuses before any switch"
        );
    });
    let mut table = String::from(
        "| switch | plane | engage p50 | engage p99 | release p50 | release p99 | drills |\n|---|---|---|---|---|---|---|\n",
    );
    for global in [false, true] {
        let mut engaged: Vec<Vec<u128>> = vec![Vec::new(); PLANES.len()];
        let mut released: Vec<Vec<u128>> = vec![Vec::new(); PLANES.len()];
        for n in 0..drills() {
            let (on, off) = drill(&rt, global, n);
            for plane in 0..PLANES.len() {
                engaged[plane].push(on[plane]);
                released[plane].push(off[plane]);
            }
        }
        for plane in 0..PLANES.len() {
            engaged[plane].sort_unstable();
            released[plane].sort_unstable();
            table.push_str(&format!(
                "| {} | {} | {} ms | {} ms | {} ms | {} ms | {} |\n",
                if global { "global" } else { "agent" },
                PLANES[plane],
                percentile(&engaged[plane], 50.0),
                percentile(&engaged[plane], 99.0),
                percentile(&released[plane], 50.0),
                percentile(&released[plane], 99.0),
                drills(),
            ));
        }
    }
    eprintln!(
        "\nkill-switch drills (ms from `kubectl tollgate kill`/`unkill` until the plane holds/lets go):\n{table}"
    );
    let out = tollgate_e2e::repo_root().join("target/e2e-runs/kill-switch-drills.md");
    std::fs::write(&out, &table).unwrap();
}
