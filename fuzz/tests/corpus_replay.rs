//! Every input in the fuzz corpora (`fuzz/corpus/<target>/`, which
//! scripts/fuzz.sh grows and where crash reproducers are added) runs
//! through its target's code on stable: a regression test per input.

#[test]
fn fuzz_corpora_replay_without_panics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    for (name, run) in tunmesh_fuzz::TARGETS {
        let dir = root.join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("no corpus for {name} in {}", dir.display());
        };
        for e in entries.flatten() {
            let data = std::fs::read(e.path()).unwrap();
            run(&data);
            total += 1;
        }
    }
    assert!(total >= 4, "the corpora are empty");
}
