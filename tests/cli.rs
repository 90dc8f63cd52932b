//! The `glm-run` binary end to end, as users and scripts call it: greedy output against transformers,
//! the `--json` schema, `--plan` against the bytes actually loaded, `--save-quantized` round trips,
//! stdin, the Hugging Face offline cache, and clean one-line failures that leave nothing behind.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs glm-run with `args`, offline (no test may touch the network), feeding `stdin` when given.
fn glm_run_with(args: &[&str], env: &[(&str, &Path)], stdin: Option<&str>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_glm-run"));
    command
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("GLM_RUN_MEMORY_LIMIT")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("glm-run starts");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

fn glm_run(args: &[&str]) -> Run {
    glm_run_with(args, &[], None)
}

/// The `--json` object of a successful run.
fn json_run(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let run = glm_run(&all);
    assert_eq!(run.code, 0, "glm-run {all:?} failed: {}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "glm-run {all:?}: stdout is not one JSON object ({e}): {}",
            run.stdout
        )
    })
}

/// A failed run: non-zero exit, nothing on stdout, one line on stderr naming `needles`.
fn assert_fails(run: &Run, needles: &[&str]) {
    assert_ne!(run.code, 0, "should fail; stdout: {}", run.stdout);
    assert!(run.stdout.is_empty(), "partial output: {}", run.stdout);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{}", run.stderr);
    assert!(lines[0].starts_with("glm-run: error: "), "{}", lines[0]);
    for needle in needles {
        assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    }
}

fn demo_str() -> String {
    demo().to_string_lossy().into_owned()
}

fn special_free(text: &str) -> String {
    ["<|user|>", "<|endoftext|>", "<|observation|>"]
        .iter()
        .fold(text.to_string(), |t, s| t.replace(s, ""))
}

#[test]
fn greedy_is_deterministic_and_matches_transformers() {
    for reference in demo_greedy("f32") {
        let mut args = vec![
            "--max-new-tokens",
            "48",
            "--dtype",
            "f32",
            "--quant",
            "none",
        ];
        if reference.mode == "raw" {
            args.push("--raw");
        }
        args.push(&reference.prompt);
        let first = json_run(&args);
        let second = json_run(&args);
        assert_eq!(first["tokens"], second["tokens"], "{:?}", reference.prompt);
        assert_eq!(first["text"], second["text"]);
        assert_eq!(ids(&first["prompt_tokens"]), reference.prompt_ids);
        let tokens = ids(&first["tokens"]);
        let trusted = reference.trusted_tokens();
        assert_eq!(&tokens[..trusted.len()], trusted, "{:?}", reference.prompt);
        if trusted.len() == reference.tokens.len() {
            assert_eq!(tokens, reference.tokens);
            assert_eq!(first["text"], special_free(&reference.text).as_str());
        }
    }
}

#[test]
fn streamed_text_is_the_json_text() {
    let prompt = "What say you to my love?";
    let json = json_run(&["--max-new-tokens", "24", prompt]);
    let run = glm_run(&["--max-new-tokens", "24", prompt]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout, format!("{}\n", json["text"].as_str().unwrap()));
    // The decision and the speed report go to stderr, not into the answer.
    assert!(run.stderr.contains("dense"), "{}", run.stderr);
    assert!(run.stderr.contains("tok/s"), "{}", run.stderr);
    // On the CPU every --decode mode is the op-by-op decoder: the same text.
    let plain = glm_run(&["--max-new-tokens", "24", "--decode", "plain", prompt]);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    assert_eq!(plain.stdout, run.stdout);
}

#[test]
fn json_has_every_field_with_its_type() {
    for (quant, expected) in [("4bit", "nf4"), ("none", "dense")] {
        let json = json_run(&[
            "--quant",
            quant,
            "--dtype",
            "f16",
            "--max-new-tokens",
            "5",
            "--raw",
            "ROMEO.\n",
        ]);
        let object = json.as_object().expect("an object");
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        for key in [
            "prompt_tokens",
            "tokens",
            "text",
            "finish_reason",
            "timings",
            "memory",
            "quant",
            "dtype",
            "device",
        ] {
            assert!(keys.contains(&key), "{key} missing from {json}");
        }
        let id_list = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_u64));
        assert!(
            id_list(&json["prompt_tokens"])
                && !json["prompt_tokens"].as_array().unwrap().is_empty()
        );
        assert!(id_list(&json["tokens"]));
        assert_eq!(json["tokens"].as_array().unwrap().len(), 5);
        assert!(json["text"].is_string());
        assert_eq!(json["finish_reason"], "length");
        for key in [
            "load_s",
            "prefill_tok_s",
            "decode_tok_s",
            "prefill_s",
            "decode_s",
        ] {
            let value = json["timings"][key].as_f64();
            assert!(value.is_some_and(|v| v >= 0.0), "timings.{key}: {json}");
        }
        assert!(json["timings"]["prefill_tok_s"].as_f64().unwrap() > 0.0);
        for key in [
            "planned_bytes",
            "planned_weight_bytes",
            "measured_weight_bytes",
            "peak_rss_bytes",
        ] {
            assert!(
                json["memory"][key].as_u64().is_some_and(|v| v > 0),
                "memory.{key}: {json}"
            );
        }
        let memory = &json["memory"];
        assert!(memory["planned_bytes"].as_u64() > memory["planned_weight_bytes"].as_u64());
        assert_eq!(
            memory["planned_weight_bytes"],
            memory["measured_weight_bytes"]
        );
        assert_eq!(json["quant"], expected);
        assert_eq!(json["dtype"], "f16");
        assert_eq!(json["device"], "cpu");
    }
    let stop = json_run(&["--max-new-tokens", "100", "What say you to my love?"]);
    assert_eq!(stop["finish_reason"], "stop");
}

/// The CLI's plan in bytes, and what the load then measured, for one model directory and settings.
fn plan_and_measure(dir: &str, dtype: &str, quant: &str, prompt: &str) {
    let what = format!("{dir} --dtype {dtype} --quant {quant}");
    let plan = json_run(&["--plan", "--model", dir, "--dtype", dtype, "--quant", quant]);
    let chosen = plan["choice"].as_str().unwrap();
    assert_eq!(
        chosen,
        if quant == "4bit" { "nf4" } else { "dense" },
        "{what}"
    );
    for side in ["dense", "nf4"] {
        let f = &plan[side];
        let parts: u64 = ["embedding", "attention", "mlp", "norms", "lm_head"]
            .iter()
            .map(|k| f[k].as_u64().unwrap())
            .sum();
        assert_eq!(f["weights"].as_u64(), Some(parts), "{what}");
    }
    let run = json_run(&[
        "--model",
        dir,
        "--dtype",
        dtype,
        "--quant",
        quant,
        "--max-new-tokens",
        "1",
        "--raw",
        prompt,
    ]);
    assert_eq!(
        run["memory"]["measured_weight_bytes"], plan[chosen]["weights"],
        "{what}: planned vs loaded weight bytes"
    );
}

#[test]
fn plan_weights_equal_the_bytes_loaded() {
    for dtype in ["f32", "f16"] {
        for quant in ["none", "4bit"] {
            plan_and_measure(&demo_str(), dtype, quant, "ROMEO.");
            for name in FIXTURES {
                if name.ends_with("-nf4") && quant == "none" {
                    continue;
                }
                let dir = fixture_with_tokenizer(name);
                plan_and_measure(dir.path().to_str().unwrap(), dtype, quant, "t5 t6 t7");
            }
        }
    }
    // A 4-bit checkpoint cannot be asked for dense weights: said in one line, before loading anything.
    let nf4 = fixture_with_tokenizer("glm4-nf4");
    let run = glm_run(&[
        "--model",
        nf4.path().to_str().unwrap(),
        "--quant",
        "none",
        "--raw",
        "t5",
    ]);
    assert_fails(&run, &["--quant none", "4bit"]);
}

#[test]
fn plan_prints_both_precisions_and_the_decision() {
    let run = glm_run(&["--plan", "--quant", "auto"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for row in [
        "embedding",
        "attention",
        "mlp",
        "kv cache",
        "activations",
        "framework overhead",
        "total",
    ] {
        assert!(run.stdout.contains(row), "{row} missing:\n{}", run.stdout);
    }
    assert!(run.stdout.contains("f32") && run.stdout.contains("nf4"));
    assert!(run.stdout.contains("decision: dense"), "{}", run.stdout);
    // A memory cap that only 4 bits fit flips the decision, and says why.
    let run = glm_run(&["--plan", "--memory-limit", "60MiB"]);
    assert!(run.stdout.contains("decision: nf4"), "{}", run.stdout);
}

#[test]
fn fixture_greedy_matches_transformers() {
    for name in FIXTURES {
        let dir = fixture_with_tokenizer(name);
        let dir_str = dir.path().to_str().unwrap();
        let eos = eos_ids(dir.path());
        for (prompt, reference) in fixture_greedy(name) {
            let json = json_run(&[
                "--model",
                dir_str,
                "--max-new-tokens",
                "32",
                "--raw",
                &prompt,
            ]);
            let expected = until_eos(&reference, &eos, 32);
            assert_eq!(ids(&json["tokens"]), expected, "{name}: {prompt}");
        }
    }
}

#[test]
fn save_quantized_then_reload_gives_the_4bit_tokens() {
    let out_root = tempfile::tempdir().unwrap();
    let demo_dir = demo_str();
    let fixtures: Vec<(&str, tempfile::TempDir)> = ["glm", "glm4", "glm4v"]
        .into_iter()
        .map(|name| (name, fixture_with_tokenizer(name)))
        .collect();
    let mut models: Vec<(&str, String, &str)> = vec![("demo", demo_dir, "ROMEO.\n")];
    for (name, dir) in &fixtures {
        models.push((
            name,
            dir.path().to_string_lossy().into_owned(),
            "t87 t265 t47",
        ));
    }
    for (name, dir, prompt) in models {
        let out = out_root.path().join(name);
        let out_str = out.to_str().unwrap();
        let run = glm_run(&["--model", &dir, "--save-quantized", out_str]);
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{name}: {}", run.stdout);
        let config = read_json(&out.join("config.json"));
        let quant = &config["quantization_config"];
        assert_eq!(quant["quant_method"], "bitsandbytes", "{name}");
        assert_eq!(quant["bnb_4bit_quant_type"], "nf4");
        assert_eq!(quant["load_in_4bit"], true);
        for file in ["model.safetensors", "tokenizer.json"] {
            assert!(out.join(file).is_file(), "{name}: {file} not written");
        }
        let saved = json_run(&[
            "--model",
            out_str,
            "--max-new-tokens",
            "24",
            "--raw",
            prompt,
        ]);
        let at_load = json_run(&[
            "--model",
            &dir,
            "--quant",
            "4bit",
            "--max-new-tokens",
            "24",
            "--raw",
            prompt,
        ]);
        assert_eq!(
            saved["quant"], "nf4",
            "{name}: a saved 4-bit checkpoint loads as 4-bit"
        );
        assert_eq!(saved["tokens"], at_load["tokens"], "{name}");
        assert_eq!(
            saved["memory"]["measured_weight_bytes"], at_load["memory"]["measured_weight_bytes"],
            "{name}"
        );
    }
    // Only the finished directories are left: no staging directory.
    assert_eq!(entries(out_root.path()), ["demo", "glm", "glm4", "glm4v"]);
}

#[test]
fn prompt_from_stdin_and_raw_mode() {
    let args = ["--json", "--max-new-tokens", "8", "--raw"];
    let from_arg = json_run(&["--max-new-tokens", "8", "--raw", "To be, or not to be"]);
    let run = glm_run_with(&args, &[], Some("To be, or not to be\n"));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let from_stdin: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(from_stdin["prompt_tokens"], from_arg["prompt_tokens"]);
    assert_eq!(from_stdin["tokens"], from_arg["tokens"]);
    // Raw: the tokenizer's own [gMASK]<sop> prefix, no chat roles; chat: the template around it.
    let raw = ids(&from_arg["prompt_tokens"]);
    assert_eq!(&raw[..2], [2, 4]);
    assert!(!raw.contains(&7) && !raw.contains(&8));
    let chat = ids(&json_run(&["--max-new-tokens", "1", "To be, or not to be"])["prompt_tokens"]);
    assert_eq!(&chat[..4], [2, 4, 7, 210]);
    assert_eq!(chat.last(), Some(&8));
    let system =
        ids(&json_run(&["--max-new-tokens", "1", "--system", "Speak.", "Hi"])["prompt_tokens"]);
    assert_eq!(&system[..3], [2, 4, 6]);
    let empty = glm_run_with(&["--raw"], &[], Some("\n\n"));
    assert_fails(&empty, &["prompt is empty"]);
}

/// A Hugging Face cache as huggingface_hub lays it out: blobs, snapshot symlinks, refs/main.
fn fake_hub_cache(home: &Path, repo: &str, commit: &str, files_from: &Path) {
    let repo_dir = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let blobs = repo_dir.join("blobs");
    let snapshot = repo_dir.join("snapshots").join(commit);
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snapshot).unwrap();
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for (i, entry) in fs::read_dir(files_from).unwrap().enumerate() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_str().unwrap();
        let keep =
            name.ends_with(".json") || name.ends_with(".safetensors") || name.ends_with(".jinja");
        if !entry.file_type().unwrap().is_file() || !keep || name.starts_with("eval") {
            continue;
        }
        let blob = format!("{i:040x}");
        fs::copy(entry.path(), blobs.join(&blob)).unwrap();
        symlink(Path::new("../../blobs").join(&blob), snapshot.join(name)).unwrap();
    }
}

#[test]
fn hub_id_loads_from_the_offline_cache() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    fake_hub_cache(home.path(), "shakespeare/glm-demo", commit, &demo());
    let env = [("HF_HOME", home.path())];
    let args = |model: &'static str, revision: Option<&'static str>| {
        let mut a = vec![
            "--json",
            "--model",
            model,
            "--max-new-tokens",
            "8",
            "--raw",
            "ROMEO.\n",
        ];
        if let Some(r) = revision {
            a.extend(["--revision", r]);
        }
        a
    };
    let local = json_run(&["--max-new-tokens", "8", "--raw", "ROMEO.\n"]);
    for revision in [None, Some(commit)] {
        let run = glm_run_with(&args("shakespeare/glm-demo", revision), &env, None);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let cached: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(cached["tokens"], local["tokens"]);
    }
    let missing = glm_run_with(&args("shakespeare/not-cached", None), &env, None);
    assert_fails(
        &missing,
        &[
            "shakespeare/not-cached",
            "not in the Hugging Face cache",
            "HF_HUB_OFFLINE",
        ],
    );
    let missing_rev = glm_run_with(&args("shakespeare/glm-demo", Some("v2")), &env, None);
    assert_fails(&missing_rev, &["revision v2", "no refs/v2"]);
}

#[test]
fn bad_flags_fail_in_one_line() {
    let cases: [(&[&str], &str); 9] = [
        (
            &["--quant", "8bit", "x"],
            "possible values: auto, 4bit, none",
        ),
        (&["--bogus", "x"], "--bogus"),
        (&["--dtype", "f64", "x"], "possible values: f16, bf16, f32"),
        (&["--max-new-tokens", "many", "x"], "--max-new-tokens"),
        (
            &["--device", "tpu", "x"],
            "expected auto, cpu, cuda or cuda:N",
        ),
        (&["--device", "cuda", "x"], "--device cuda"),
        (&["--memory-limit", "12 parsecs", "x"], "unknown unit"),
        (&["--top-p", "1.5", "x"], "top"),
        (
            &["--decode", "eager", "x"],
            "possible values: plain, fused, graph",
        ),
    ];
    for (args, needle) in cases {
        assert_fails(&glm_run(args), &[needle]);
    }
    assert_fails(
        &glm_run(&["--temperature", "-1", "x"]),
        &["temperature", "-1"],
    );
    assert_fails(
        &glm_run(&["--repeat-penalty", "-2", "x"]),
        &["repetition penalty"],
    );
    assert_fails(&glm_run(&["--max-new-tokens", "0", "x"]), &["max"]);
    // Help is not an error.
    let help = glm_run(&["--help"]);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("--save-quantized"));
}

#[test]
fn bad_model_directories_fail_in_one_line() {
    let missing = glm_run(&["--model", "/nonexistent/model/dir", "x"]);
    assert_fails(
        &missing,
        &[
            "/nonexistent/model/dir",
            "point --model at a model directory",
        ],
    );
    // A relative path that does not exist reads like a hub id: both readings are named.
    let typo = glm_run(&["--model", "models/dmeo", "x"]);
    assert_fails(&typo, &["models/dmeo", "no local directory models/dmeo"]);

    let empty = tempfile::tempdir().unwrap();
    let run = glm_run(&["--model", empty.path().to_str().unwrap(), "x"]);
    assert_fails(&run, &["config.json"]);

    let dir = tempfile::tempdir().unwrap();
    copy_files(&demo(), dir.path());
    let dir_str = dir.path().to_str().unwrap();
    let weights = dir.path().join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    // Truncated mid-tensor, as an interrupted download leaves it.
    fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(
        &glm_run(&["--model", dir_str, "x"]),
        &["model.safetensors", "re-download"],
    );
    // Garbage header.
    fs::write(&weights, b"not a safetensors file at all").unwrap();
    assert_fails(&glm_run(&["--model", dir_str, "x"]), &["model.safetensors"]);
    fs::write(&weights, &bytes).unwrap();

    let config_path = dir.path().join("config.json");
    let config = fs::read_to_string(&config_path).unwrap();
    fs::write(
        &config_path,
        config.replace("Glm4ForCausalLM", "LlamaForCausalLM"),
    )
    .unwrap();
    for args in [
        vec!["--model", dir_str, "x"],
        vec!["--plan", "--model", dir_str],
    ] {
        assert_fails(
            &glm_run(&args),
            &["config.json", "unknown architecture", "LlamaForCausalLM"],
        );
    }
    fs::write(&config_path, "{ not json").unwrap();
    assert_fails(&glm_run(&["--model", dir_str, "x"]), &["config.json"]);
    fs::write(&config_path, &config).unwrap();

    fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert_fails(&glm_run(&["--model", dir_str, "x"]), &["tokenizer.json"]);
}

#[test]
fn save_quantized_fails_cleanly_and_leaves_nothing_behind() {
    let parent = tempfile::tempdir().unwrap();
    // An existing non-empty directory is never touched.
    let existing = parent.path().join("existing");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("keep.txt"), "mine").unwrap();
    let run = glm_run(&["--save-quantized", existing.to_str().unwrap()]);
    assert_fails(&run, &["existing", "not empty", "new directory"]);
    assert_eq!(entries(&existing), ["keep.txt"]);
    assert_eq!(
        fs::read_to_string(existing.join("keep.txt")).unwrap(),
        "mine"
    );

    // A corrupt input fails before anything is renamed into place, and the staging directory goes.
    let broken = tempfile::tempdir().unwrap();
    copy_files(&demo(), broken.path());
    let weights = broken.path().join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    let out = parent.path().join("out");
    let run = glm_run(&[
        "--model",
        broken.path().to_str().unwrap(),
        "--save-quantized",
        out.to_str().unwrap(),
    ]);
    assert_fails(&run, &["model.safetensors"]);

    // The older ChatGLM layout is refused with the way out.
    let chatglm = fixture("chatglm");
    let run = glm_run(&[
        "--model",
        chatglm.to_str().unwrap(),
        "--save-quantized",
        out.to_str().unwrap(),
    ]);
    assert_fails(&run, &["ChatGLM", "glm-4-9b-chat-hf"]);

    // Already 4-bit: nothing to do.
    let run = glm_run(&[
        "--model",
        fixture("glm4-nf4").to_str().unwrap(),
        "--save-quantized",
        out.to_str().unwrap(),
    ]);
    assert_fails(&run, &["already quantized"]);

    assert_eq!(entries(parent.path()), ["existing"]);
}
