//! Writes each target's seed corpus to `<dir>/<target>/<name>`: `scripts/fuzz` starts the
//! fuzzers from them.
#![forbid(unsafe_code)]

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fuzz-seeds DIR");
        std::process::exit(2);
    };
    for (target, _) in sluice_fuzzing::TARGETS {
        let folder = dir.join(target);
        std::fs::create_dir_all(&folder)?;
        for (name, input) in sluice_fuzzing::seeds::seeds(target) {
            std::fs::write(folder.join(name), input)?;
        }
    }
    Ok(())
}
