//! A process that appends audit records as fast as it can and prints each acknowledgement
//! (`SEQ HASH`) once its append returned. The crash test kills it with SIGKILL under load and
//! checks that every acknowledged record is in the store and the chain verifies.

use std::io::Write;
use std::sync::Arc;

use clap::Parser;
use jiff::Timestamp;
use tollgate_audit::{
    AuditLog, Entry, Event, Identity, PostgresStore, SqliteStore, Store, WriterConfig,
};

#[derive(Debug, Parser)]
struct Args {
    /// SQLite file to write.
    #[arg(long, conflicts_with = "postgres")]
    sqlite: Option<std::path::PathBuf>,
    /// PostgreSQL URL to write.
    #[arg(long)]
    postgres: Option<String>,
    /// The chain to extend.
    #[arg(long, default_value = "crash-writer")]
    chain: String,
    /// Concurrent appenders.
    #[arg(long, default_value_t = 64)]
    tasks: usize,
}

async fn run<S: Store>(store: S, args: &Args) {
    let (log, _task) = AuditLog::open(Arc::new(store), WriterConfig::new(&args.chain))
        .await
        .expect("open the audit log");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for task in 0..args.tasks {
        let log = log.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            for step in 0u64.. {
                let mut entry = Entry::new(
                    Timestamp::now(),
                    Event::Decide,
                    Identity {
                        username: "system:serviceaccount:crash:agent-writer".into(),
                        ..Identity::default()
                    },
                );
                entry.agent = Some("crash/writer".into());
                entry.run = Some(format!("run-{task}"));
                entry.step = Some(step + 1);
                entry.tool = Some("lookup_order".into());
                entry.arguments = Some(serde_json::json!({"order": step}));
                let appended = log.append(entry).await.expect("append");
                if tx
                    .send(format!("{} {}", appended.seq, appended.hash))
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    drop(tx);
    let stdout = std::io::stdout();
    while let Some(line) = rx.recv().await {
        let mut out = stdout.lock();
        writeln!(out, "{line}").expect("stdout");
        out.flush().expect("stdout");
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match (&args.sqlite, &args.postgres) {
        (Some(path), None) => run(SqliteStore::open(path).expect("open sqlite"), &args).await,
        (None, Some(url)) => {
            run(
                PostgresStore::connect(url).await.expect("connect postgres"),
                &args,
            )
            .await
        }
        _ => panic!("give --sqlite PATH or --postgres URL"),
    }
}
