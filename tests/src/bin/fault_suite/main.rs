//! The fault suite: Sluice on a 3-node JetStream cluster (each node in its own network
//! namespace, R3 streams, `sync_interval: always`) under a steady load of signed
//! webhooks while one fault at a time happens, with the delivery invariants checked
//! after each. Run with `./scripts/fault-suite [SCENARIO…]` (as root); see
//! docs/TESTING.md.

mod check;
mod env;
mod load;
mod net;
mod scenarios;

use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    if wanted.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: fault-suite [SCENARIO…]\nscenarios, in the order they run:");
        for s in scenarios::ALL {
            println!("  {:<18} {}", s.name(), s.describe());
        }
        return Ok(());
    }
    let chosen = scenarios::choose(&wanted)?;
    if let Err(why) = net::available() {
        println!(
            "fault suite skipped: it needs root and `ip netns` to put each NATS node in its own network namespace ({why})"
        );
        return Ok(());
    }
    let started = Instant::now();
    let env = env::Env::start().await;
    let mut env = match env {
        Ok(env) => env,
        Err(e) => {
            net::cleanup();
            return Err(e);
        }
    };
    println!(
        "set up in {:.1} s (3 nodes in namespaces, R3 streams, 2 ingest, 2 dispatchers, 2 runners); logs in {}",
        started.elapsed().as_secs_f64(),
        env.dir.display()
    );
    let mut results = Vec::new();
    for scenario in chosen {
        let result = scenarios::run(&mut env, scenario).await;
        results.push(result);
    }
    env.shutdown();
    net::cleanup();
    println!();
    println!("| scenario | result | time | requests | 503s | other | max answer | recovery |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut failed = 0;
    for r in &results {
        if !r.failures.is_empty() {
            failed += 1;
        }
        println!("{}", r.row());
    }
    println!(
        "\nfault suite: {} scenarios, {} failed, {:.0} s in all",
        results.len(),
        failed,
        started.elapsed().as_secs_f64()
    );
    for r in results.iter().filter(|r| !r.failures.is_empty()) {
        println!("\n{} failed:", r.name);
        for f in &r.failures {
            println!("  - {f}");
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
