//! The fault suite: what a hostile or unlucky user does to `ember`, on the tiny fixtures.
//!
//! Every case asserts the same four things: a non-zero exit (or the documented one), an error
//! that names the file, key or row, no panic, and nothing that was on disk before changed or
//! lost. Kills (`kill -9`) land at several points of `train` and `merge`; a full disk is a
//! small tmpfs where this process may mount one (skipped with a message elsewhere).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixtures, model_folder, CHATML};

fn ember(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .env("EMBER_LOG", "off")
        .output()
        .unwrap()
}

/// A fresh folder, unique per call.
fn tempdir(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ember-faults-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A failure that is an error, not a crash: non-zero exit, no panic, the message has `needles`.
#[track_caller]
fn assert_refused(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected a failure, got success; stderr:\n{err}");
    assert_ne!(o.status.code(), Some(101), "panicked:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(o.status.success(), "failed ({:?}):\n{}", o.status, stderr(o));
}

/// Every file under `dir` with its bytes (to prove nothing changed).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Names under `dir` that are staging leftovers (`.NAME.tmp-PID`).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.contains(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

/// The llama fixture with the fixtures' tokenizer and `template` as chat template.
fn model_dir(dir: &Path, template: &str) -> PathBuf {
    model_folder("llama", &dir.join("model"), template)
}

/// A completion data file of a few lines.
fn completion_data(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let lines = [
        "Beautiful is better than ugly.",
        "Explicit is better than implicit.",
        "Simple is better than complex.",
        "Complex is better than complicated.",
        "Flat is better than nested.",
        "Sparse is better than dense.",
        "Readability counts.",
        "Errors should never pass silently.",
    ];
    let text: String = lines
        .iter()
        .map(|l| serde_json::json!({ "text": l }).to_string() + "\n")
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// A run config over `model` and `data` into `dir/out`, with `train` lines added.
fn run_config(dir: &Path, model: &Path, data: &Path, train: &str) -> PathBuf {
    let path = dir.join("run.yaml");
    let yaml = format!(
        "base_model: {}\noutput_dir: {}\nseed: 7\nlora:\n  r: 4\n  lora_alpha: 8\n  target_modules: [q_proj, v_proj]\n\
         data:\n  train: {}\n  format: completion\n  max_seq_len: 64\n  shuffle: true\n\
         train:\n  micro_batch_size: 2\n  learning_rate: 0.01\n  log_every: 1\n{train}",
        model.display(),
        dir.join("out").display(),
        data.display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `ember merge` arguments: base, adapter, out, and `--dtype` when given.
fn merge_args(base: &Path, adapter: &Path, out: &Path, dtype: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "merge".into(),
        "--base".into(),
        base.display().to_string(),
        "--adapter".into(),
        adapter.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if let Some(d) = dtype {
        args.extend(["--dtype".to_string(), d.to_string()]);
    }
    args
}

/// Runs `ember` with owned arguments.
fn ember_owned(args: &[String]) -> Output {
    ember(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn train(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    ember(&args)
}

#[test]
fn a_used_output_dir_is_refused_and_overwrite_replaces_its_run() {
    let dir = tempdir("outdir");
    let model = model_dir(&dir, CHATML);
    let config = run_config(
        &dir,
        &model,
        &completion_data(&dir),
        "  max_steps: 3\n  save_every: 1\n",
    );
    assert_ok(&train(&config, &[]));
    let out = dir.join("out");
    let before = snapshot(&out);

    let o = train(&config, &[]);
    assert_refused(&o, &["already holds", "--resume", "--overwrite", "checkpoint-"]);
    assert_eq!(snapshot(&out), before, "a refused run changed the earlier one");

    // A user file in output_dir is never removed by --overwrite.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = train(&config, &["--overwrite"]);
    assert_refused(&o, &["notes.txt"]);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    std::fs::remove_file(out.join("notes.txt")).unwrap();

    // --overwrite with a shorter run: only the new run's steps and checkpoints remain.
    let shorter = run_config(
        &dir,
        &model,
        &completion_data(&dir),
        "  max_steps: 2\n  save_every: 1\n",
    );
    assert_ok(&train(&shorter, &["--overwrite"]));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(steps, vec![1, 2], "{metrics}");
    assert!(!out.join("checkpoint-3").exists());
    assert!(out.join("checkpoint-2").exists() && out.join("adapter/adapter_config.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_with_changed_lora_settings_is_refused() {
    let dir = tempdir("resume-r");
    let model = model_dir(&dir, CHATML);
    let config = run_config(
        &dir,
        &model,
        &completion_data(&dir),
        "  max_steps: 2\n  save_every: 1\n",
    );
    assert_ok(&train(&config, &[]));
    let out = dir.join("out");
    let before = snapshot(&out);
    for (set, key) in [
        ("lora.r=8", "r: 4 vs 8"),
        ("lora.lora_alpha=16", "lora_alpha: 8 vs 16"),
        ("train.micro_batch_size=1", "train.micro_batch_size: 2 vs 1"),
        ("data.max_seq_len=32", "data.max_seq_len: 64 vs 32"),
    ] {
        let o = train(&config, &["--set", set, "--resume"]);
        assert_refused(&o, &["checkpoint-2", key]);
    }
    assert_eq!(snapshot(&out), before);
    // The same settings resume (nothing left to do: the adapter is written again).
    assert_ok(&train(&config, &["--resume"]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn out_of_vocabulary_token_ids_are_named() {
    let dir = tempdir("oov");
    let model = model_dir(&dir, CHATML);
    for (rows, needle) in [
        ("{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 99999, 3]}\n", "row 2"),
        (
            "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [4, 5]}\n{\"input_ids\": [-3, 5]}\n",
            "row 3",
        ),
        ("{\"input_ids\": [1, 2, 3], \"labels\": [-100, 2, 777]}\n", "row 1"),
    ] {
        let data = dir.join("tokens.jsonl");
        std::fs::write(&data, rows).unwrap();
        let config = run_config(&dir, &model, &data, "  max_steps: 1\n");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("format: completion", "format: tokens");
        std::fs::write(&config, text).unwrap();
        let o = train(&config, &[]);
        assert_refused(&o, &["tokens.jsonl", needle, "vocabulary"]);
        assert!(!dir.join("out").exists(), "a refused run wrote its output_dir");
    }
    let o = ember(&["generate", "--model", model.to_str().unwrap(), "--input-ids", "1,999"]);
    assert_refused(&o, &["token id 999", "vocabulary"]);
    let o = ember(&["generate", "--model", model.to_str().unwrap(), "--input-ids", "1,-3"]);
    assert_refused(&o, &["-3"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Templates that loop for ever, write without end, or build ever larger strings fail fast
/// with a message, and do not take the machine's memory.
#[test]
fn hostile_chat_templates_fail_fast() {
    let cases = [
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "instruction budget",
        ),
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "template",
        ),
        (
            "{% set s = namespace(v='ab') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
            "memory",
        ),
    ];
    for (template, needle) in cases {
        let dir = tempdir("template");
        let model = model_dir(&dir, template);
        let start = Instant::now();
        let o = ember(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--chat",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ]);
        assert_refused(&o, &[needle]);
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{template} took {:?}",
            start.elapsed()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn eval_with_no_usable_sample_fails() {
    let dir = tempdir("eval-empty");
    let model = model_dir(&dir, CHATML);
    let data = completion_data(&dir);
    let o = ember(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--format",
        "completion",
        "--max-seq-len",
        "2",
        "--out",
        dir.join("report").to_str().unwrap(),
    ]);
    assert_refused(&o, &["train.jsonl", "max_seq_len 2"]);
    assert!(!dir.join("report/eval_report.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// An adapter holding NaN is refused by every command that reads adapters.
#[test]
fn non_finite_adapters_are_refused() {
    let dir = tempdir("nan");
    let source = fixtures().join("llama/adapter_trained");
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(source.join("adapter_config.json"), adapter.join("adapter_config.json")).unwrap();
    let bytes = std::fs::read(source.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.data().to_vec(), v.shape().to_vec()))
        .collect();
    tensors.sort();
    tensors[0].1[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let poisoned = tensors[0].0.clone();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &adapter.join("adapter_model.safetensors")).unwrap();
    let model = fixtures().join("llama");
    let inputs = model.join("inputs.json");
    let (a, m) = (adapter.to_str().unwrap(), model.to_str().unwrap());
    let logits = dir.join("logits.safetensors");
    let o = ember(&[
        "forward",
        "--model",
        m,
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        logits.to_str().unwrap(),
        "--adapter",
        a,
    ]);
    assert_refused(&o, &["adapter_model.safetensors", &poisoned, "NaN"]);
    assert!(!logits.exists());
    let with_tokenizer = model_dir(&dir, CHATML);
    let o = ember(&[
        "generate",
        "--model",
        with_tokenizer.to_str().unwrap(),
        "--adapter",
        a,
        "--input-ids",
        "1,2",
    ]);
    assert_refused(&o, &[&poisoned]);
    let o = ember_owned(&merge_args(&model, &adapter, &dir.join("merged"), None));
    assert_refused(&o, &[&poisoned]);
    assert!(!dir.join("merged").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ember … | head`: the reader goes away; Ember stops without a panic.
#[test]
fn a_closed_stdout_does_not_panic() {
    let model = fixtures().join("llama");
    let dir = tempdir("pipe");
    let tokenizer_model = model_dir(&dir, CHATML);
    for args in [
        vec!["inspect", model.to_str().unwrap()],
        vec![
            "generate",
            "--model",
            tokenizer_model.to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-new-tokens",
            "64",
        ],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let status = child.wait().unwrap();
        assert_ne!(status.code(), Some(101), "{args:?} panicked:\n{err}");
        assert!(!err.contains("panicked"), "{args:?}:\n{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ctrl-C saves a checkpoint, exits 130 and prints a resume command with the `--set` flags.
#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130() {
    let dir = tempdir("ctrlc");
    let model = model_dir(&dir, CHATML);
    let config = run_config(&dir, &model, &completion_data(&dir), "  max_steps: 100000\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["train", config.to_str().unwrap(), "--set", "train.learning_rate=0.005"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = dir.join("out/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !metrics.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: sends SIGINT to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("--set train.learning_rate=0.005 --resume"), "{err}");
    let checkpoints: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `ember args` and kills it with SIGKILL after `delay` (or lets it finish first).
fn kill_after(args: &[&str], delay: Duration) -> std::process::ExitStatus {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    child.wait().unwrap()
}

/// Runs `ember args` and kills it with SIGKILL once `metrics` has `lines` lines, plus `jitter`
/// (so the kill lands at any phase of a step: forward, checkpoint write, prune). Returns whether
/// the run was killed (it may finish first).
fn kill_at_line(args: &[&str], metrics: &Path, lines: usize, jitter: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        let done = std::fs::read_to_string(metrics).map_or(0, |t| t.lines().count());
        if done >= lines {
            std::thread::sleep(jitter);
            let _ = child.kill();
            return !child.wait().unwrap().success();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A pseudo-random delay in `[lo, hi)` ms, different per run (time and pid), printed so a
/// failure can be reproduced by hand.
fn random_delays(n: usize, lo: u64, hi: u64) -> Vec<Duration> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (std::process::id() as u64) << 32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Duration::from_millis(lo + x % (hi - lo))
        })
        .collect()
}

/// `kill -9` at random points of a training run, then `--resume` (or `--overwrite` when no
/// checkpoint was complete yet): the final adapter is the uninterrupted run's, bit for bit,
/// and no staging folder is left.
#[test]
fn kill_9_during_training_then_resume_gives_the_uninterrupted_adapter() {
    let dir = tempdir("kill-train");
    let model = model_dir(&dir, CHATML);
    let data = completion_data(&dir);
    let steps = "  max_steps: 300\n  save_every: 1\n  keep_last: 2\n";
    let reference_dir = tempdir("kill-train-ref");
    let reference = run_config(&reference_dir, &model, &data, steps);
    let start = Instant::now();
    assert_ok(&train(&reference, &[]));
    // Kills land within the time an uninterrupted run takes on this machine now.
    let run_ms = start.elapsed().as_millis() as u64;
    let expected = std::fs::read(reference_dir.join("out/adapter/adapter_model.safetensors")).unwrap();

    let config = run_config(&dir, &model, &data, steps);
    let out = dir.join("out");
    // Kill points: after a random number of logged lines (steps), at a random phase of the
    // next step (up to the time one step takes).
    let step_ms = (run_ms / 300).max(1);
    let points: Vec<(usize, Duration)> = random_delays(4, 1, 280)
        .into_iter()
        .zip(random_delays(4, 0, step_ms + 1))
        .map(|(line, jitter)| (line.as_millis() as usize, jitter))
        .collect();
    eprintln!("kill points (metrics lines, jitter): {points:?}");
    let metrics = out.join("metrics.jsonl");
    let mut killed = 0;
    for (line, jitter) in points {
        let has_checkpoint = std::fs::read_dir(&out)
            .is_ok_and(|entries| entries.flatten().any(|e| e.path().join("trainer_state.json").exists()));
        let mut args = vec!["train", config.to_str().unwrap()];
        if has_checkpoint {
            args.push("--resume");
        } else if out.exists() {
            args.push("--overwrite");
        }
        let lines_before = std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
        killed += usize::from(kill_at_line(&args, &metrics, lines_before.max(line), jitter));
    }
    assert!(killed > 0, "no kill landed during a run");
    let has_checkpoint =
        std::fs::read_dir(&out).is_ok_and(|e| e.flatten().any(|e| e.path().join("trainer_state.json").exists()));
    let o = train(&config, &[if has_checkpoint { "--resume" } else { "--overwrite" }]);
    assert_ok(&o);
    let got = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        got == expected,
        "the resumed adapter differs from the uninterrupted run's"
    );
    assert_eq!(leftovers(&out), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&reference_dir);
}

/// `kill -9` during `merge`: the base is untouched and `--out` is absent or complete; the
/// next merge into the same `--out` removes what the killed one left.
#[test]
fn kill_9_during_merge_leaves_the_base_and_no_partial_output() {
    let dir = tempdir("kill-merge");
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for e in std::fs::read_dir(fixtures().join("qwen3")).unwrap().flatten() {
        if e.path().is_file() && e.file_name() != "model.safetensors" {
            std::fs::copy(e.path(), base.join(e.file_name())).unwrap();
        }
    }
    // The fixture plus a 128 MB tensor, so that a merge lasts long enough to be killed.
    let bytes = std::fs::read(fixtures().join("qwen3/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let padding = vec![0x3Fu8; 4096 * 8192 * 4];
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    views.push((
        "model.padding".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4096, 8192], &padding).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &base.join("model.safetensors")).unwrap();
    drop(padding);
    let before = snapshot(&base);
    let adapter = fixtures().join("qwen3/adapter_trained");
    let out = dir.join("merged");
    let start = Instant::now();
    let o = ember_owned(&merge_args(&base, &adapter, &out, Some("bf16")));
    assert_ok(&o);
    let merge_ms = start.elapsed().as_millis() as u64;
    std::fs::remove_dir_all(&out).unwrap();
    let mut killed = 0;
    for delay in random_delays(6, merge_ms / 20 + 1, merge_ms * 9 / 10 + 2) {
        let args = merge_args(&base, &adapter, &out, Some("bf16"));
        let status = kill_after(&args.iter().map(String::as_str).collect::<Vec<_>>(), delay);
        killed += usize::from(!status.success());
        if out.exists() {
            // Complete: a later merge into it is refused, and its weights load.
            assert!(out.join("model.safetensors").exists() && out.join("config.json").exists());
            let o = ember(&["inspect", out.to_str().unwrap()]);
            assert_ok(&o);
            std::fs::remove_dir_all(&out).unwrap();
        } else {
            assert!(!status.success());
        }
        assert_eq!(snapshot(&base), before, "the base changed");
    }
    assert!(killed > 0, "no kill landed during a merge");
    let o = ember_owned(&merge_args(&base, &adapter, &out, None));
    assert_ok(&o);
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shard name in the index that leaves the model folder is refused before anything is
/// opened for writing; the base keeps every byte.
#[test]
fn merge_refuses_index_paths_outside_the_folder() {
    let dir = tempdir("index-paths");
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("qwen3").join(f), base.join(f)).unwrap();
    }
    let bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let keys: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let adapter = fixtures().join("qwen3/adapter_trained");
    for shard in [
        "../base/model.safetensors".to_string(),
        base.join("model.safetensors").display().to_string(),
        "sub/../model.safetensors".to_string(),
    ] {
        let map: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|k| (k.clone(), serde_json::Value::from(shard.clone())))
            .collect();
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(base.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let before = snapshot(&base);
        for out in [dir.join("merged"), base.join("merged")] {
            let o = ember_owned(&merge_args(&base, &adapter, &out, None));
            assert_refused(&o, &["model.safetensors.index.json", "plain file name"]);
            assert!(!out.exists());
        }
        let o = ember(&["inspect", base.to_str().unwrap()]);
        assert_refused(&o, &["plain file name"]);
        assert_eq!(snapshot(&base), before, "{shard}: the base changed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Truncated and corrupted model, adapter, config and GGUF files: every command that reads
/// them fails with the file's name and no panic.
#[test]
fn corrupted_files_give_errors_that_name_them() {
    let dir = tempdir("corrupt");
    let inputs = fixtures().join("llama/inputs.json");
    let cases: [(&str, &str); 4] = [
        ("llama", "model.safetensors"),
        ("llama", "config.json"),
        ("llama/adapter_trained", "adapter_model.safetensors"),
        ("llama/adapter_trained", "adapter_config.json"),
    ];
    for (source, file) in cases {
        let good = std::fs::read(fixtures().join(source).join(file)).unwrap();
        let cuts = [0, 7, 8, 20, good.len() / 3, good.len() - 1];
        for (n, cut) in cuts.into_iter().enumerate() {
            let model = dir.join(format!("m-{n}"));
            let _ = std::fs::remove_dir_all(&model);
            std::fs::create_dir_all(model.join("adapter")).unwrap();
            for f in ["config.json", "model.safetensors"] {
                std::fs::copy(fixtures().join("llama").join(f), model.join(f)).unwrap();
            }
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(
                    fixtures().join("llama/adapter_trained").join(f),
                    model.join("adapter").join(f),
                )
                .unwrap();
            }
            let target = if source.ends_with("adapter_trained") {
                model.join("adapter").join(file)
            } else {
                model.join(file)
            };
            let mut bad = good[..cut].to_vec();
            if n % 2 == 1 && cut > 12 {
                // Corrupt rather than only truncate: a byte flipped in the header.
                bad = good.clone();
                bad[cut.min(40)] ^= 0x5A;
            }
            std::fs::write(&target, &bad).unwrap();
            let out = model.join("logits.safetensors");
            let o = ember(&[
                "forward",
                "--model",
                model.to_str().unwrap(),
                "--inputs",
                inputs.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--adapter",
                model.join("adapter").to_str().unwrap(),
            ]);
            if o.status.success() {
                // A flipped byte may land in a value and keep the file valid.
                assert!(n % 2 == 1, "{file} cut at {cut} was accepted");
            } else {
                assert_refused(&o, &[file]);
            }
        }
    }
    // GGUF: truncated at several points.
    let good = std::fs::read(fixtures().join("gguf_arch/qwen2.gguf")).unwrap();
    for cut in [0, 3, 16, 100, 4000, good.len() / 2, good.len() - 1] {
        let path = dir.join("bad.gguf");
        std::fs::write(&path, &good[..cut]).unwrap();
        let o = ember(&["inspect", path.to_str().unwrap()]);
        assert_refused(&o, &["bad.gguf"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A learning rate of 1e6 makes the run diverge: it stops with an error, writes no final
/// adapter, and keeps the checkpoints made before.
#[test]
fn a_diverging_run_stops_with_an_error() {
    let dir = tempdir("diverge");
    let model = model_dir(&dir, CHATML);
    let config = run_config(
        &dir,
        &model,
        &completion_data(&dir),
        "  max_steps: 20\n  save_every: 1\n",
    );
    let o = train(&config, &["--set", "train.learning_rate=1e6"]);
    assert_refused(&o, &["learning_rate"]);
    assert!(!dir.join("out/adapter").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A full disk (a 2 MiB tmpfs) during training and merging: a clear error, nothing partial,
/// the previous outputs intact. Needs permission to mount; skipped with a message otherwise.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_fails_cleanly() {
    let dir = tempdir("full");
    let mount = dir.join("small");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", mount.to_str().unwrap()])
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let model = model_dir(&dir, CHATML);
        // Merge: the 0.5 MB model fits twice at most; fill the disk so that it cannot.
        std::fs::write(mount.join("filler"), vec![0u8; 1_800_000]).unwrap();
        let out = mount.join("merged");
        let o = ember_owned(&merge_args(
            &model,
            &fixtures().join("llama/adapter_trained"),
            &out,
            Some("f32"),
        ));
        assert_refused(&o, &["No space left"]);
        assert!(!out.exists());
        assert_eq!(leftovers(&mount), Vec::<String>::new());
        std::fs::remove_file(mount.join("filler")).unwrap();

        // Training: checkpoints every step into the small disk until it is full.
        let config = dir.join("run.yaml");
        run_config(
            &dir,
            &model,
            &completion_data(&dir),
            "  max_steps: 400\n  save_every: 1\n  keep_last: 1000\n",
        );
        let text = std::fs::read_to_string(&config).unwrap().replace(
            &dir.join("out").display().to_string(),
            &mount.join("out").display().to_string(),
        );
        std::fs::write(&config, text).unwrap();
        let o = train(&config, &[]);
        assert_refused(&o, &["No space left"]);
        // Every checkpoint on disk is complete and resumable.
        let out = mount.join("out");
        for e in std::fs::read_dir(&out).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("checkpoint-") {
                for f in [
                    "trainer_state.json",
                    "optimizer.safetensors",
                    "adapter/adapter_model.safetensors",
                ] {
                    assert!(e.path().join(f).exists(), "{name} lacks {f}");
                }
            }
        }
        assert_eq!(leftovers(&out), Vec::<String>::new());
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
        for line in metrics.lines() {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "bad line {line:?}"
            );
        }
    });
    let _ = Command::new("umount").arg(&mount).status();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Sampling settings that mean nothing are refused before the model loads.
#[test]
fn generate_refuses_meaningless_sampling_settings() {
    let model = fixtures().join("llama");
    for (flag, value) in [
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
    ] {
        let o = ember(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input-ids",
            "1",
            flag,
            value,
        ]);
        assert_refused(&o, &[flag]);
    }
}

/// `ember forward --out` replaces an earlier logits file but never another file, such as the
/// model's own weights.
#[test]
fn forward_never_replaces_a_file_that_is_not_its_output() {
    let dir = tempdir("forward-out");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("llama").join(f), model.join(f)).unwrap();
    }
    let inputs = fixtures().join("llama/inputs.json");
    let run = |out: &Path| {
        ember(&[
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let before = snapshot(&model);
    let o = run(&model.join("model.safetensors"));
    assert_refused(&o, &["model.safetensors", "not an earlier"]);
    assert_eq!(snapshot(&model), before);
    let logits = dir.join("logits.safetensors");
    assert_ok(&run(&logits));
    assert_ok(&run(&logits));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two runs into one output_dir at once: the second is refused while the first runs, and the
/// first finishes unharmed.
#[test]
fn a_second_run_into_a_busy_output_dir_is_refused() {
    let dir = tempdir("busy");
    let model = model_dir(&dir, CHATML);
    let config = run_config(&dir, &model, &completion_data(&dir), "  max_steps: 100000\n");
    let mut first = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["train", config.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics = dir.join("out/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !metrics.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for extra in [&[][..], &["--resume"][..], &["--overwrite"][..]] {
        let o = train(&config, extra);
        assert_refused(&o, &["in use by another ember process"]);
    }
    #[cfg(unix)]
    // SAFETY: sends SIGINT to the child this test started.
    unsafe {
        libc::kill(first.id() as i32, libc::SIGINT)
    };
    assert_eq!(first.wait().unwrap().code(), Some(130));
    assert_ok(&train(&config, &["--resume", "--set", "train.max_steps=1"]));
    let _ = std::fs::remove_dir_all(&dir);
}
