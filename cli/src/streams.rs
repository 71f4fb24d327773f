//! `sluice streams apply`: the one command that creates and changes Sluice's streams,
//! buckets and each cluster's runner consumer.

use crate::args::{Global, StreamsCommand};

pub async fn run(global: &Global, command: StreamsCommand) -> anyhow::Result<()> {
    match command {
        StreamsCommand::Apply(a) => {
            let client = crate::connect(global).await?;
            let js = async_nats::jetstream::new(client);
            let settings = a.settings();
            if a.dry_run {
                let plan = sluice_core::streams::plan(&js, &settings).await?;
                print!("{plan}");
                if plan.is_empty() {
                    println!("Nothing to change.");
                } else if !plan.old_layout.is_empty() {
                    println!(
                        "Applying needs --purge-old-layout: run states and logs written by an older Sluice cannot be read by this one."
                    );
                }
                return Ok(());
            }
            let plan = sluice_core::streams::apply(&js, &settings, a.purge_old_layout).await?;
            print!("{plan}");
            if plan.is_empty() {
                println!("Nothing changed: everything already matched.");
            } else {
                println!("Applied.");
            }
            Ok(())
        }
    }
}
