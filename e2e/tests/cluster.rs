//! Tollgate as it is deployed: its own images as pods on a real node, installed with its Helm
//! chart, agents as pods (see `tollgate_e2e::cluster` for the node).
//!
//! This test binary has its own harness (`harness = false`): it first runs itself again inside
//! network and mount namespaces of its own, starts the node there once, installs Tollgate, and
//! then runs each test in turn against that one installation. Arguments are substrings of test
//! names to run (none: all); `--list` lists them.

use std::process::ExitCode;
use std::time::Instant;

#[path = "cluster/agents.rs"]
mod agents;
#[path = "cluster/drill.rs"]
mod drill;
#[path = "cluster/faults.rs"]
mod faults;
#[path = "cluster/install.rs"]
mod install;
#[path = "cluster/llm.rs"]
mod llm;
#[path = "cluster/secrets.rs"]
mod secrets;
#[path = "cluster/support.rs"]
mod support;

use support::Test;

fn tests() -> Vec<Test> {
    let mut all = Vec::new();
    all.extend(install::tests());
    all.extend(agents::tests());
    all.extend(drill::tests());
    all.extend(llm::tests());
    // After every test that sent a secret through Tollgate, before its pods go.
    all.extend(secrets::tests());
    // Last: these restart, scale and finally uninstall Tollgate.
    all.extend(faults::tests());
    all
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tests = tests();
    if args.iter().any(|a| a == "--list") {
        for test in &tests {
            println!("{}: test", test.name);
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let exact = args.iter().any(|a| a == "--exact");
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|t| {
            filters.is_empty()
                || filters.iter().any(|f| {
                    if exact {
                        t.name == f.as_str()
                    } else {
                        t.name.contains(f.as_str())
                    }
                })
        })
        .collect();
    if selected.is_empty() {
        println!("\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed\n");
        return ExitCode::SUCCESS;
    }
    match tollgate_e2e::cluster::isolate() {
        Ok(Some(code)) => return ExitCode::from(u8::try_from(code).unwrap_or(101)),
        Ok(None) => {}
        Err(e) => {
            eprintln!("the e2e node cannot run here: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    println!("\nrunning {} tests", selected.len());
    let started = Instant::now();
    let mut failed = Vec::new();
    for test in &selected {
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(|| (test.run)());
        let seconds = start.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("test {} ... ok ({seconds:.1}s)", test.name),
            Err(_) => {
                println!("test {} ... FAILED ({seconds:.1}s)", test.name);
                failed.push(test.name);
            }
        }
    }
    let passed = selected.len() - failed.len();
    if failed.is_empty() {
        println!(
            "\ntest result: ok. {passed} passed; 0 failed; finished in {:.1}s\n",
            started.elapsed().as_secs_f64()
        );
        ExitCode::SUCCESS
    } else {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
        println!(
            "\ntest result: FAILED. {passed} passed; {} failed; finished in {:.1}s\n",
            failed.len(),
            started.elapsed().as_secs_f64()
        );
        ExitCode::FAILURE
    }
}
