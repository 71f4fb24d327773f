//! Every seed, and every input a fuzzer once crashed or hung on (kept in
//! `fuzz/regressions/<target>/`), replayed through its target in `cargo test`.

use std::path::Path;

#[test]
fn seeds_and_kept_findings_replay_cleanly() {
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    for (target, run) in sluice_fuzzing::TARGETS {
        let seeds = sluice_fuzzing::seeds::seeds(target);
        assert!(!seeds.is_empty(), "{target} has no seeds");
        for (_, input) in &seeds {
            run(input);
            replayed += 1;
        }
        if let Ok(entries) = std::fs::read_dir(kept.join(target)) {
            for entry in entries {
                let path = entry.expect("a kept input").path();
                let input = std::fs::read(&path).expect("read a kept input");
                run(&input);
                replayed += 1;
            }
        }
    }
    assert!(
        replayed > sluice_fuzzing::TARGETS.len(),
        "{replayed} inputs"
    );
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for (target, _) in sluice_fuzzing::TARGETS {
        let file = targets.join(format!("{target}.rs"));
        let body =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            body.contains(&format!("sluice_fuzzing::{target}(")),
            "{} must call sluice_fuzzing::{target}",
            file.display()
        );
    }
}

/// The router target reaches past verification: a signed seed is verified and then
/// refused only because nothing stores it (503), an unsigned one is refused (401), and
/// both requests of a kept-alive pair are answered.
#[test]
fn the_router_target_answers_as_ingest_does() {
    let seeds = sluice_fuzzing::seeds::seeds("ingest_router");
    let seed = |name: &str| {
        let (_, input) = seeds
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no seed {name}"));
        String::from_utf8_lossy(&sluice_fuzzing::ingest_exchange(input)).into_owned()
    };
    let signed = seed("github-pull_request.opened");
    assert!(signed.starts_with("HTTP/1.1 503"), "{signed}");
    let pair = seed("kept-alive-pair");
    assert!(pair.starts_with("HTTP/1.1 503"), "{pair}");
    assert!(pair.contains("HTTP/1.1 401"), "the second request: {pair}");
    let short = seed("short-body");
    assert!(short.starts_with("HTTP/1.1 4"), "{short}");
}
