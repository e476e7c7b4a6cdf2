//! The README's configuration reference is `tunmesh-router --help`, word
//! for word (scripts/readme-help.sh regenerates it).

#[test]
fn readme_configuration_reference_matches_help() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunmesh-router"))
        .arg("--help")
        .env_clear()
        .output()
        .expect("running tunmesh-router --help");
    let help = String::from_utf8(out.stdout).expect("utf-8 help");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("<!-- router-help:start -->")
        .expect("start marker in README.md");
    let end = readme
        .find("<!-- router-help:end -->")
        .expect("end marker in README.md");
    let block = &readme[start..end];
    let body = block
        .split_once("```text\n")
        .and_then(|(_, rest)| rest.rsplit_once("\n```"))
        .map(|(b, _)| b)
        .expect("a ```text block between the markers");
    assert_eq!(
        body.trim_end(),
        help.trim_end(),
        "README.md's configuration reference is out of date: run scripts/readme-help.sh"
    );
}
