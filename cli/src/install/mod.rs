//! `sluice install` and `sluice uninstall`: answers (a wizard on a terminal, or flags,
//! variables and a values file), rendered into typed objects by pure functions,
//! checked against the cluster before anything is written, then applied with
//! server-side apply so a second run converges and upgrades the same way.

pub mod args;
pub mod manifests;
pub mod object;
pub mod render;
pub mod values;

use anyhow::{bail, Context};

pub use args::{InstallArgs, UninstallArgs};
use values::Values;

/// The answers from the defaults, the values file, then flags and variables.
pub fn answers(args: &InstallArgs) -> anyhow::Result<Values> {
    let base = match &args.values_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the values file {}", path.display()))?;
            Values::from_yaml(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?
        }
        None => Values::default(),
    };
    Ok(args.set.apply(base))
}

/// Refuses invalid answers, one line per problem.
pub fn check(values: &Values) -> anyhow::Result<()> {
    if let Err(errors) = values.validate() {
        bail!("invalid answers:\n  {}", errors.join("\n  "));
    }
    Ok(())
}

/// `sluice install`.
pub async fn run(args: InstallArgs) -> anyhow::Result<()> {
    let values = answers(&args)?;
    check(&values)?;
    if args.dry_run {
        let objects = render::render(&values, None);
        print!("{}", object::to_yaml_stream(&objects));
        return Ok(());
    }
    bail!("only --dry-run is available yet")
}

/// `sluice uninstall`.
pub async fn uninstall(_args: UninstallArgs) -> anyhow::Result<()> {
    bail!("not available yet")
}
