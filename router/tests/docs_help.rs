//! docs/configuration.md's reference of `tunmesh-router` and `tunmesh-ctl`
//! is their `--help`, word for word (scripts/docs-help.sh regenerates it):
//! every `<!-- help: COMMAND -->` block of these binaries equals COMMAND's
//! output, and each binary and subcommand has its block.

fn blocks(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(i) = rest.find("<!-- help: ") {
        let after = &rest[i + "<!-- help: ".len()..];
        let (cmd, tail) = after.split_once(" -->").expect("a closed help marker");
        let (body, next) = tail
            .split_once("<!-- end help -->")
            .expect("an end help marker");
        let text = body
            .split_once("```text\n")
            .and_then(|(_, b)| b.rsplit_once("\n```"))
            .map(|(b, _)| b.to_string())
            .unwrap_or_default();
        out.push((cmd.to_string(), text));
        rest = next;
    }
    out
}

fn run(bin: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(bin)
        .args(args)
        .env_clear()
        .output()
        .expect("running the binary");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

#[test]
fn configuration_reference_matches_help() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    let blocks = blocks(&doc);
    let mut seen = Vec::new();
    for (cmd, text) in &blocks {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let bin = match words.first() {
            Some(&"tunmesh-router") => env!("CARGO_BIN_EXE_tunmesh-router"),
            Some(&"tunmesh-ctl") => env!("CARGO_BIN_EXE_tunmesh-ctl"),
            _ => continue,
        };
        let help = run(bin, &words[1..]);
        assert_eq!(
            text.trim_end(),
            help.trim_end(),
            "docs/configuration.md's `{cmd}` is out of date: run scripts/docs-help.sh"
        );
        seen.push(cmd.clone());
    }
    let mut want = vec![
        "tunmesh-router --help".to_string(),
        "tunmesh-ctl --help".to_string(),
    ];
    for sub in [
        "status",
        "graph",
        "check",
        "rotate-key",
        "accept-key",
        "uninstall",
    ] {
        want.push(format!("tunmesh-ctl {sub} --help"));
    }
    for w in want {
        assert!(
            seen.contains(&w),
            "docs/configuration.md has no block for `{w}` (have {seen:?})"
        );
    }
}
