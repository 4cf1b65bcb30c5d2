//! The binary: both commands run, JSON is one object, separate processes agree on the
//! generated tokens, bad input fails with a message.

mod common;

use common::{field, run};

const SMALL: &str =
    "--layers 1 --hidden 32 --q-heads 2 --kv-heads 1 --head-dim 16 --intermediate 64 --vocab 64";

#[test]
fn serve_reports_json_and_two_processes_agree() {
    let mut args = vec![
        "serve",
        "--prompts",
        "6",
        "--max-len",
        "48",
        "--max-new",
        "3",
        "--format",
        "json",
    ];
    args.extend(SMALL.split_whitespace());
    let (ok, a, err) = run(&args);
    assert!(ok, "{err}");
    let a = a.trim();
    assert!(
        a.starts_with('{') && a.ends_with('}') && !a.contains('\n'),
        "{a}"
    );
    assert_eq!(field(a, "prompts"), "6");
    assert_eq!(field(a, "generated_tokens"), "18");
    assert!(field(a, "tokens_per_s").parse::<f64>().unwrap() > 0.0);
    let (_, b, _) = run(&args);
    assert_eq!(field(a, "output_digest"), field(&b, "output_digest"));
    let mut other = args.clone();
    other.extend_from_slice(&["--model-seed", "7"]);
    let (_, c, _) = run(&other);
    assert_ne!(field(a, "output_digest"), field(&c, "output_digest"));
}

#[test]
fn generate_prints_tokens_and_bad_input_fails() {
    let mut args = vec!["generate", "--prompt-tokens", "20", "--max-new", "4"];
    let mut bad = args.clone();
    args.extend(SMALL.split_whitespace());
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("tokens"))
        .expect("a tokens line");
    assert_eq!(line.split_whitespace().count(), 5);
    bad.extend(SMALL.split_whitespace());
    bad.extend_from_slice(&["--num-blocks", "1"]);
    let (ok, _, err) = run(&bad);
    assert!(!ok);
    assert!(err.contains("out of KV blocks"), "{err}");
}
