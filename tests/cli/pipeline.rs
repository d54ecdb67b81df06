//! The plan pipeline's commands on SmolLM2-135M (needs `scripts/setup-model.sh`), at toy
//! sizes: `moac plan make` end to end (calibrate, profile, optimize, validate; the work
//! files kept), its plan loads in `inspect`, `compile --emit` and `generate`, and a rerun
//! reuses every stage; the single commands and their bad input: no panic, exit 1, the
//! file named, nothing written.
#![allow(clippy::unwrap_used)]

use moac_test_support::*;

#[test]
fn plan_make_end_to_end_and_the_plan_runs() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("made.json");
    let plan_s = plan.to_str().unwrap();
    let args = [
        "plan",
        "make",
        "--model",
        m,
        "--density",
        "0.5",
        "--lengths",
        "512",
        "--samples",
        "1",
        "--validate-length",
        "640",
        "--validate-samples",
        "1",
        "--max-answer",
        "32",
        "--constraint-lengths",
        "512,640,1024",
        "-o",
        plan_s,
    ];
    let out = moac!(&args);
    ok(&out);
    let e = stderr(&out);
    for stage in ["calibrate", "profile", "optimize", "validate", "<- chosen"] {
        assert!(e.contains(stage), "{stage}: {e}");
    }
    let work = tmp.path().join("made.json.work");
    for f in [
        "calib.jsonl",
        "validate.jsonl",
        "profile.safetensors",
        "plans/summary.json",
        "plans/front.svg",
        "plans/uniform.json",
    ] {
        assert!(work.join(f).is_file(), "{f}");
    }
    assert!(!work.join("profile.safetensors.parts").exists());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("plans/summary.json")).unwrap())
            .unwrap();
    for p in summary["plans"].as_array().unwrap() {
        for d in p["density"].as_array().unwrap() {
            assert!(d.as_f64().unwrap() <= 0.5, "{p}");
        }
    }
    // The official format, 30 layers x 9 heads.
    let made: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(made["alphas"].as_array().unwrap().len(), 30);
    assert_eq!(made["betas"][0].as_array().unwrap().len(), 9);
    // It loads everywhere a plan goes.
    ok(&moac!(&[
        "inspect",
        plan_s,
        "--config",
        m,
        "--prompt-len",
        "900"
    ]));
    let art = tmp.path().join("art");
    ok(&moac!(&[
        "compile",
        plan_s,
        "--config",
        m,
        "--emit",
        "cuda",
        "-o",
        art.to_str().unwrap()
    ]));
    let answer = ok(&moac!(&[
        "generate",
        "--model",
        m,
        "--plan",
        plan_s,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "4"
    ]));
    assert!(!answer.trim().is_empty());
    // A rerun reuses the calibration, profile and held-out files.
    let t = std::fs::metadata(work.join("calib.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    ok(&moac!(&args));
    assert_eq!(
        std::fs::metadata(work.join("calib.jsonl"))
            .unwrap()
            .modified()
            .unwrap(),
        t
    );
}

#[test]
fn pipeline_commands_reject_bad_input() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    // An empty calibration file.
    std::fs::write(p("empty.jsonl"), "").unwrap();
    fails(
        &moac!(&[
            "profile",
            "--model",
            m,
            "--calib",
            &p("empty.jsonl"),
            "-o",
            &p("prof.st")
        ]),
        &["empty.jsonl"],
    );
    assert!(!tmp.path().join("prof.st").exists());
    // Not a profile.
    fails(
        &moac!(&[
            "optimize",
            "--profile",
            &p("empty.jsonl"),
            "--model",
            m,
            "--density",
            "0.5",
            "-o",
            &p("plans")
        ]),
        &["empty.jsonl"],
    );
    assert!(!tmp.path().join("plans").exists());
    // A calibration length that leaves no room, one beyond the model.
    fails(
        &moac!(&[
            "calibrate",
            "--model",
            m,
            "--lengths",
            "300",
            "-o",
            &p("c.jsonl")
        ]),
        &["300"],
    );
    fails(
        &moac!(&[
            "calibrate",
            "--model",
            m,
            "--lengths",
            "16384",
            "-o",
            &p("c.jsonl")
        ]),
        &["16384", "8192"],
    );
    assert!(!tmp.path().join("c.jsonl").exists());
    // A calibration text that is not UTF-8, or too short for the length.
    std::fs::write(p("bytes.txt"), [b'a', 0xff, 0xfe, b'\n']).unwrap();
    fails(
        &moac!(&[
            "calibrate",
            "--model",
            m,
            "--source",
            &p("bytes.txt"),
            "--lengths",
            "1024",
            "-o",
            &p("c.jsonl")
        ]),
        &["bytes.txt", "not UTF-8"],
    );
    std::fs::write(p("short.txt"), "One paragraph.\n\nAnother one.\n").unwrap();
    fails(
        &moac!(&[
            "calibrate",
            "--model",
            m,
            "--source",
            &p("short.txt"),
            "--lengths",
            "1024",
            "-o",
            &p("c.jsonl")
        ]),
        &["short.txt", "too short"],
    );
    // An unknown family is a usage error of the command line (clap's exit status 2).
    let out = moac!(&[
        "calibrate",
        "--model",
        m,
        "--families",
        "kv,lines",
        "-o",
        &p("c.jsonl")
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown calibration family \"lines\""));
    assert!(!tmp.path().join("c.jsonl").exists());
    // A density outside (0, 1].
    fails(
        &moac!(&[
            "plan",
            "make",
            "--model",
            m,
            "--density",
            "1.5",
            "--lengths",
            "512",
            "--samples",
            "1",
            "-o",
            &p("x.json")
        ]),
        &["density"],
    );
    assert!(!tmp.path().join("x.json").exists());
}

#[test]
fn eval_heads_scores_the_copy_steps_and_shows_the_plans_spans() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    // Two key-value lookups (true answers, copied from the prompt: no model run).
    ok(&moac!(&[
        "calibrate",
        "--model",
        m,
        "--lengths",
        "512",
        "--samples",
        "2",
        "--families",
        "kv",
        "--max-answer",
        "32",
        "-o",
        &p("calib.jsonl")
    ]));
    ok(&moac!(&[
        "plan",
        "uniform",
        "--config",
        m,
        "--alpha",
        "0",
        "--beta",
        "0.5",
        "-o",
        &p("uniform.json")
    ]));
    let out = ok(&moac!(&[
        "eval",
        "heads",
        "--model",
        m,
        "--calib",
        &p("calib.jsonl"),
        "--plan",
        &p("uniform.json"),
        "--top",
        "5",
        "-o",
        &p("heads.json")
    ]));
    assert!(out.contains("2 samples"), "{out}");
    // Five heads listed, each with the uniform plan's span at N = 512: 50%.
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_end().ends_with("50%"))
        .collect();
    assert_eq!(rows.len(), 5, "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("heads.json")).unwrap()).unwrap();
    assert_eq!(json["hit"].as_array().unwrap().len(), 30);
    assert_eq!(json["mass"][0].as_array().unwrap().len(), 9);
    assert!(json["steps"].as_u64().unwrap() > 0);
    // Every score is a share in [0, 1], and some head reads the needle.
    let all: Vec<f64> = ["hit", "mass"]
        .iter()
        .flat_map(|k| json[k].as_array().unwrap().clone())
        .flat_map(|l| l.as_array().unwrap().clone())
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(all.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(all.iter().any(|&v| v > 0.1));
    // No true-answer sample of the length asked for: a clear error, nothing written.
    fails(
        &moac!(&[
            "eval",
            "heads",
            "--model",
            m,
            "--calib",
            &p("calib.jsonl"),
            "--lengths",
            "1024",
            "-o",
            &p("none.json")
        ]),
        &["calib.jsonl", "no true-answer samples"],
    );
    assert!(!tmp.path().join("none.json").exists());
}
