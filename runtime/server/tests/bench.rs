//! `quiver bench` through the real binary, against a dev node and embedded,
//! with the raw QUIC baseline, and against local clusters of child
//! processes: every mode runs and reports sane numbers.

mod common;

use common::DevNode;

fn run_json(node: &DevNode, args: &[&str]) -> serde_json::Value {
    let stdout = node.ok(args);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn result<'a>(report: &'a serde_json::Value, mode: &str) -> &'a serde_json::Value {
    report["results"].as_array().unwrap().iter().find(|r| r["mode"] == mode).unwrap_or_else(|| panic!("no {mode}"))
}

#[test]
fn bench_modes_report_throughput_latency_and_ratios() {
    let node = DevNode::start();
    let small = ["--records", "3000", "--record-bytes", "512", "--format", "json"];

    let mut args = vec!["bench", "produce", "--baseline", "--acks", "all"];
    args.extend_from_slice(&small);
    let report = run_json(&node, &args);
    let produce = result(&report, "produce");
    assert_eq!(produce["records"], 3000);
    assert_eq!(produce["bytes"], 3000 * 512);
    assert!(produce["mib_per_s"].as_f64().unwrap() > 0.0);
    assert!(produce["latency_ms_p99"].as_f64().unwrap() >= produce["latency_ms_p50"].as_f64().unwrap());
    assert!(report["ratios"]["produce_vs_quic_upload"].as_f64().unwrap() > 0.0);
    assert_eq!(result(&report, "quic-upload")["bytes"], 3000 * 512);
    // The broker is another process: this process's CPU is not the cost.
    assert!(report["ratios"]["produce_vs_quic_upload_by_cpu"].is_null(), "{report}");

    // The records produced above are there for the consumer.
    let mut args = vec!["bench", "consume"];
    args.extend_from_slice(&small);
    let report = run_json(&node, &args);
    assert_eq!(result(&report, "consume")["records"], 3000);
    let d: serde_json::Value =
        serde_json::from_str(&node.ok(&["topic", "describe", "quiver-bench", "--format", "json"])).unwrap();
    let total: i64 = d["partitions"].as_array().unwrap().iter().map(|p| p["high_watermark"].as_i64().unwrap()).sum();
    assert_eq!(total, 3000, "consume reused the produced records");

    let report = run_json(&node, &["bench", "e2e", "--records", "500", "--rate", "1000", "--format", "json"]);
    let e2e = result(&report, "e2e");
    assert_eq!(e2e["records"], 500);
    assert!(e2e["latency_ms_p50"].as_f64().unwrap() > 0.0);
    // Where the latency goes: each stage measured; queued and delivered
    // split every record's way in two, so neither is longer than the whole.
    let stages: Vec<&str> = e2e["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stages, ["queued", "acked", "delivered"], "{e2e}");
    for (i, stage) in e2e["stages"].as_array().unwrap().iter().enumerate() {
        let p50 = stage["ms_p50"].as_f64().unwrap();
        assert!(p50 > 0.0, "{e2e}");
        if i != 1 {
            assert!(p50 <= e2e["latency_ms_p50"].as_f64().unwrap() + 0.01, "{e2e}");
        }
    }

    let report = run_json(&node, &["bench", "quic", "--records", "1000", "--format", "json"]);
    assert_eq!(result(&report, "quic-download")["bytes"], 1000 * 1024);

    // A dev node of its own, read from /proc: idle under the aim of 64 MiB
    // (≈ 16 MiB on the machines seen), higher at its peak under load.
    let args = ["bench", "memory", "--records", "20000", "--settle-secs", "1", "--format", "json"];
    let report = run_json(&node, &args);
    let memory = result(&report, "broker-memory");
    assert_eq!(memory["records"], 20000);
    let mib = |key: &str| memory[key].as_f64().unwrap_or_else(|| panic!("no {key}: {memory}"));
    assert!(mib("rss_idle_mib") > 1.0 && mib("rss_idle_mib") < 64.0, "{memory}");
    assert!(mib("rss_peak_mib") >= mib("rss_idle_mib") && mib("rss_peak_mib") >= mib("rss_after_load_mib"), "{memory}");

    let report = run_json(&node, &["bench", "produce", "--embedded", "--records", "1000", "--format", "json"]);
    assert_eq!(result(&report, "produce")["records"], 1000);

    // Rounds: each produce is paired with its own upload baseline and
    // writes to an emptied topic; the ratio is the median of the rounds.
    let args =
        ["bench", "produce", "--embedded", "--baseline", "--rounds", "3", "--records", "1000", "--format", "json"];
    let report = run_json(&node, &args);
    let modes: Vec<&str> = report["results"].as_array().unwrap().iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["quic-upload", "produce", "quic-upload", "produce", "quic-upload", "produce"], "{report}");
    // The reported ratio is the median of the per-round ratios, each
    // computed from one (baseline, produce) pair.
    let assert_median = |key: &str, of_pair: &dyn Fn(&serde_json::Value, &serde_json::Value) -> f64| {
        let mut per_round: Vec<f64> =
            report["results"].as_array().unwrap().chunks(2).map(|pair| of_pair(&pair[0], &pair[1])).collect();
        per_round.sort_by(f64::total_cmp);
        let median = report["ratios"][key].as_f64().unwrap();
        assert!((median - per_round[1]).abs() < 1e-9, "{key}: {median} is not the median of {per_round:?}");
    };
    assert_median("produce_vs_quic_upload", &|baseline, produce| {
        produce["mib_per_s"].as_f64().unwrap() / baseline["mib_per_s"].as_f64().unwrap()
    });
    // Embedded, both ends run in the bench's process: the CPU per byte of
    // the baseline over that of produce.
    let cpu_per_byte = |r: &serde_json::Value| r["cpu_seconds"].as_f64().unwrap() / r["bytes"].as_f64().unwrap();
    assert_median("produce_vs_quic_upload_by_cpu", &|baseline, produce| {
        assert!(produce["cpu_seconds"].as_f64().unwrap() > 0.0, "{report}");
        cpu_per_byte(baseline) / cpu_per_byte(produce)
    });

    // Clusters of child processes: 1 node and 3 nodes, then a failover.
    // Two kills: the second needs the first victim restarted and back in
    // the ISR.
    let args = ["bench", "cluster", "--records", "2000", "--partitions", "3", "--failovers", "2", "--format", "json"];
    let report = run_json(&node, &args);
    assert_eq!(result(&report, "produce-1-node")["records"], 2000);
    assert_eq!(result(&report, "produce-3-nodes")["records"], 2000);
    let failovers: Vec<&serde_json::Value> =
        report["results"].as_array().unwrap().iter().filter(|r| r["mode"] == "failover").collect();
    assert_eq!(failovers.len(), 2, "{report}");
    for f in failovers {
        let ms = f["failover_ms"].as_f64().unwrap();
        assert!(ms > 0.0 && ms < 60_000.0, "{ms}");
        assert!(f["killed_controller_leader"].is_boolean(), "{f}");
    }
    assert!(report["ratios"]["cluster3_vs_single_produce"].as_f64().unwrap() > 0.0);

    // Transactions against idempotent produce, with commit latencies.
    let args = ["bench", "txn", "--embedded", "--records", "20000", "--record-bytes", "100", "--format", "json"];
    let report = run_json(&node, &args);
    assert_eq!(result(&report, "produce-idempotent")["records"], 20000);
    for size in [100, 1_000, 10_000] {
        let r = result(&report, &format!("produce-txn-{size}"));
        assert_eq!(r["records"], 20000, "{report}");
        assert!(r["latency_ms_p99"].as_f64().unwrap() > 0.0, "commit latency: {r}");
        assert!(report["ratios"][format!("txn{size}_vs_idempotent")].as_f64().unwrap() > 0.0, "{report}");
    }
}
