"""End-to-end smoke runs of the experiment entrypoints in a temporary workdir."""

import json
import math

import numpy as np
import pytest

from tests.entrypoints import run_module

# A narrow Llama for the experiment smokes: what they check (outputs written, verdicts that
# follow from the numbers) does not depend on the width, and lm_tiny's width makes their
# training and evaluation, not compilation, most of their time.
TINY_LM = (
    "--config.model.hidden_size=16",
    "--config.model.intermediate_size=32",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
)


def assert_claims(workdir, results, expected):
    """``results["claims"]`` has the verdicts ``expected`` (recomputed by the caller from the
    numbers in results.json), and REPORT.md holds the same rows in its claims table."""
    claims = results["claims"]
    verdicts = {True: "holds", False: "does not hold"}
    assert [c["verdict"] for c in claims] == [verdicts[e] for e in expected]
    report = (workdir / "REPORT.md").read_text()
    assert "Verdict rule: " in report and "| claim | paper | ours | verdict |" in report
    for c in claims:
        assert f"| {c['claim']} | {c['paper']} | {c['ours']} | {c['verdict']} |" in report


def test_demo_interop_runs_and_writes_report(tmp_path):
    result = run_module(
        "experiments.demo_interop",
        f"--workdir={tmp_path}",
        "--config.max_new_tokens=8",
        "--config.num_samples=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    assert "jaxlab vs transformers" in report
    assert (tmp_path / "logits_agreement.png").stat().st_size > 1000
    assert (tmp_path / "hf_checkpoint" / "config.json").exists()


def test_bench_model_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_module("experiments.bench.model", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| decode b=1 |" in result.stdout

    data = json.loads(out.read_text())
    assert data["greedy_tokens"]["b=1"]["identical"] is True
    assert {row["name"] for row in data["rows"]} >= {"decode b=1", "prefill b=1"}
    for row in data["rows"]:
        if row["kind"] == "prefill":  # the vocabulary projection alone, at the prefill's tokens
            head = row["vocab_projection"]
            assert head["tokens"] == row["tokens_per_call"] and head["hidden"] == 128
            assert 0 < head["jaxlab_median_s"] and 0 < head["transformers_median_s"]
            assert head["prefill_ratio_bound"] > 0


def test_bench_train_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # The override must reach both side processes: the jaxlab side loads the PyTorch side's
    # 3-layer weights, which fails for any other depth.
    result = run_module(
        "experiments.bench.train", "--quick", f"--out={out}", "--config.model.num_layers=3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| train step" in result.stdout
    data = json.loads(out.read_text())
    assert data["quick"] is True
    assert (data["setup"]["batch"], data["setup"]["seq_len"], data["setup"]["num_layers"]) == (
        4,
        64,
        3,
    )
    assert data["model"]["num_hidden_layers"] == 3  # the PyTorch side's model is the config's
    # The compute bound's FLOPs, counted by hand for lm_tiny's width (hidden 256, SwiGLU 688, 8
    # heads and 4 key-value heads of 32, the byte vocabulary of 259) at 3 layers on [4, 64]:
    # weights 6 FLOPs per token, causal attention 2 products x 2 FLOPs x 3 passes per pair.
    weights = 3 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 688) + 256 * 259
    pairs = 4 * 8 * (64 * 65 // 2)
    bound = data["compute_bound"]
    assert bound["step_matmul_flops"] == 6 * 4 * 64 * weights + 3 * 3 * 2 * 2 * pairs * 32
    assert set(bound["matmul_peak_flop_s"]) == {"xla", "torch"}
    peak = max(bound["matmul_peak_flop_s"].values())
    assert bound["step_floor_s"] == pytest.approx(bound["step_matmul_flops"] / peak)
    assert bound["ratio_bound"] == pytest.approx(
        data["rows"][0]["transformers_median_s"] / bound["step_floor_s"]
    )
    assert "compute bound: " in result.stdout


def test_demo_lm_smoke_reports_perplexities(tmp_path):
    result = run_module(
        "experiments.demo_lm", f"--workdir={tmp_path}", "--config=configs/lm_smoke.py"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    assert "unigram baseline" in report and "after training (step 8)" in report
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_train_lm_rejects_a_misspelled_override(tmp_path):
    result = run_module(
        "experiments.train_lm",
        "--config=configs/lm_smoke.py",
        f"--workdir={tmp_path}",
        "--config.num_stepz=3",
    )
    assert result.returncode != 0
    assert "num_stepz" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_ademamix_experiment_smoke(tmp_path):
    result = run_module(
        "experiments.ademamix_lm",
        f"--workdir={tmp_path}",
        "--config.num_steps=12",
        "--lrs=3e-3",
        "--probe_every=2",
        *TINY_LM,
        "--config.eval_batches=1",  # as many held-out numbers to check, at a quarter the cost
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["sweep"]) == {"adamw@0.003", "ademamix@0.003"}
    assert (tmp_path / "forgetting.png").stat().st_size > 1000
    assert "steps to lose half" in (tmp_path / "REPORT.md").read_text()
    best = {
        o: min(v for k, v in results["sweep"].items() if k.startswith(o + "@"))
        for o in ("adamw", "ademamix")
    }
    kept = results["forgetting"]
    assert_claims(
        tmp_path,
        results,
        [
            best["ademamix"] < best["adamw"] - 0.01,
            kept["ademamix"]["final"] > kept["adamw"]["final"],
        ],
    )


def test_bench_optim_quick(tmp_path):
    out = tmp_path / "bench.json"
    # XLA's default compilation: the HLO pass counts are what users' compiled steps move.
    result = run_module("experiments.bench.optim", "--quick", f"--out={out}", default_compiler=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    # State sizes are exact: AdEMAMix keeps 3 buffers per parameter, 2 with b1 = 0 (as AdamW).
    assert rows["jaxlab ademamix"]["state_ratio"] == pytest.approx(1.5, rel=1e-3)
    assert rows["jaxlab ademamix b1=0"]["state_ratio"] == pytest.approx(1.0, rel=1e-3)
    # The compiled step moves at least the arrays it must read and write once (one loop per
    # leaf): 7 per parameter for AdamW and AdEMAMix with b1 = 0, 9 for AdEMAMix.
    floors = {"optax.adamw": 7, "jaxlab ademamix": 9, "jaxlab ademamix b1=0": 7}
    for name, floor in floors.items():
        assert rows[name]["hlo_passes"] >= floor, (name, rows[name]["hlo_passes"])


def test_bench_denseformer_quick_with_a_config_override_changing_the_model(tmp_path):
    # One run checks both the quick bench's rows and the override (the rows do not depend on
    # the depth): each bench run pays its own process start and compilations.
    out = tmp_path / "bench.json"
    result = run_module(
        "experiments.bench.denseformer",
        "--quick",
        f"--out={out}",
        "--config.model.num_layers=3",  # explicit, so --quick's 2 layers do not replace it
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "depth 3," in result.stdout
    data = json.loads(out.read_text())
    assert set(data["rows_ms"]) == {"Transformer", "DenseFormer 1x1", "DenseFormer 2x2"}
    assert data["num_layers"] == 3 and data["batch"] == [4, 32]  # the rest still shrunk
    # lm_tiny's Llama, counted by hand: hidden 256, SwiGLU 688, 8 query and 4 key-value heads of
    # 32, two norms per block, the byte vocabulary's 259 tied embeddings and a final norm.
    hidden, mlp, kv = 256, 688, 4 * 32
    block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden
    assert data["parameters"]["Transformer"] == 259 * hidden + hidden + 3 * block
    assert data["parameters"]["DenseFormer 1x1"] > data["parameters"]["Transformer"]


def test_bench_gpu_cpu_smoke_and_refusal(tmp_path):
    out = tmp_path / "bench.json"
    result = run_module("experiments.bench.gpu", "--allow_cpu", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    dense = [r for r in rows if r["part"] == "dense"]
    assert {r["impl"] for r in dense} == {
        "jaxlab xla",
        "jax.nn.dot_product_attention",
        "jax pallas mha",
    }
    assert max(r["max_abs_err_out"] for r in dense) < 1e-4
    sparse = [r for r in rows if r["part"] == "sparse correctness"]
    assert {r["kind"] for r in sparse} == {"hash", "qk"} and all(r["ok"] for r in sparse)
    assert max(r["max_abs_err_grad"] for r in sparse) < 1e-4
    sweep = {r["impl"]: r for r in rows if r["part"] == "sweep"}
    assert {"jax pallas mha", "hash nb=8", "qk drop=0.5"} <= set(sweep)
    assert sweep["hash nb=8"]["ideal"] > 4 and sweep["jax pallas mha"]["ideal"] == 1
    scans = [r for r in rows if r["part"] == "scan"]
    assert {(r["kind"], r["impl"]) for r in scans} == {
        (k, i) for k in ("selective_scan", "ssd") for i in ("pallas", "chunked")
    }
    assert max(r["rel_err_out"] for r in scans) < 1e-5
    refused = run_module("experiments.bench.gpu", f"--out={out}")
    assert refused.returncode != 0 and "needs an accelerator" in refused.stderr


def test_bench_attention_quick(tmp_path):
    out = tmp_path / "attention.json"
    result = run_module("experiments.bench.attention", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"dense xla", "hash nb=8", "qk drop=0.5"} <= set(rows)
    assert rows["dense xla"]["forward_speedup"] == 1.0
    # At seq 256 the hash window is both tiles (all the work): auto runs the dense masked path.
    assert rows["hash nb=2 auto"]["auto_runs"] == "dense"
    assert rows["qk drop=0.8 auto"]["auto_runs"] == "xla" and rows["qk drop=0.8 auto"]["xla_work"]
    assert (tmp_path / "attention.png").stat().st_size > 1000


def test_sparse_lm_smoke_reports_three_attentions(tmp_path):
    result = run_module(
        "experiments.sparse_lm",
        f"--workdir={tmp_path}",
        "--config.num_steps=4",
        "--config.seq_len=64",
        "--config.batch_size=32",  # the config's 4 x 512 tokens per batch, in 64-token windows
        "--config.model.sparse_attention.keep_rate=0.7",  # the labels follow the config
        *TINY_LM,
        "--config.eval_batches=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    claims = results.pop("claims")
    assert "perplexity" in results.pop("claims_rule")  # the report's verdict rule, kept beside
    assert set(results) == {"dense", "hash, 8 buckets", "qk, keep 0.7"}
    assert all(math.isfinite(r["eval_loss"]) for r in results.values())
    assert "| qk, keep 0.7 |" in (tmp_path / "REPORT.md").read_text()
    dense = results["dense"]["eval_perplexity"]
    expected = [
        "holds" if results[n]["eval_perplexity"] / dense <= 1.01 else "does not hold"
        for n in ("hash, 8 buckets", "qk, keep 0.7")
    ]
    assert [c["verdict"] for c in claims] == [*expected, claims[-1]["verdict"]]
    assert claims[-1]["verdict"] == "not measured" and "make bench-gpu" in claims[-1]["ours"]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_bench_scan_quick(tmp_path):
    out = tmp_path / "scan.json"
    result = run_module("experiments.bench.scan", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {(r["kind"], r["impl"]) for r in data["scans"]} == {
        (k, i) for k in ("selective_scan", "ssd") for i in ("sequential", "associative", "chunked")
    }
    assert data["generation"][0]["tokens_per_s"]["Mamba-1"] > 0


def test_acvi_experiment_smoke(tmp_path):
    result = run_module(
        "experiments.acvi",
        f"--workdir={tmp_path}",
        "--config.dim=10",
        "--config.etas=(0.5,)",
        "--config.seeds=(0,)",
        "--config.rate_steps=200",
        "--config.max_steps=100",
        "--config.gan.seeds=(0,)",
        "--config.gan.evaluations=200",
        "--config.gan.hidden=(8,)",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["hbg"]["0.5"]["acvi"]["reached"] == 1
    assert abs(results["two_d"]["bilinear_2d"]["gda"][1] - 0.900) < 1e-3
    assert abs(results["two_d"]["forsaken"]["acvi"][1] - 0.41193385) < 1e-4
    for row in results["gan"]["pi-acvi"]:
        assert row["violation"] < 1e-4 and 1 <= row["modes"] <= 8
    for png in ("games_2d.png", "gap_rate.png", "eta_sweep.png", "gan.png"):
        assert (tmp_path / png).stat().st_size > 1000
    baselines = ("gda", "extragradient", "optimistic_gda", "lookahead_gda")
    expected = []
    for game, rows in results["two_d"].items():  # ACVI's last iterate closest to the solution
        solution = results["two_d_solution"][game]
        acvi = math.dist(rows["acvi"], solution)
        expected.append(all(acvi < math.dist(rows[b], solution) for b in baselines))
    expected.append(  # fewer iterations than every baseline at every eta
        all(
            per["acvi"]["iterations"] < min(per[b]["iterations"] for b in baselines)
            for per in results["hbg"].values()
        )
    )
    expected.append(results["rate"]["acvi_slope"] <= -0.5)
    mmd = {k: np.mean([r["mmd"] for r in rows]) for k, rows in results["gan"].items()}
    expected.append(mmd["pi-acvi"] < min(mmd["gda"], mmd["extragradient"]))
    assert_claims(tmp_path, results, expected)


def test_acvi_gan_reads_local_mnist_files(tmp_path):
    """The GAN section on MNIST-format IDX files (random pixels here: nothing is downloaded)."""
    from tests.data.images_test import write_idx

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    result = run_module(
        "experiments.acvi",
        f"--workdir={tmp_path / 'run'}",
        "--config.dim=5",
        "--config.etas=(0.5,)",
        "--config.seeds=(0,)",
        "--config.rate_steps=60",
        "--config.max_steps=20",
        "--config.gan.seeds=(0,)",
        "--config.gan.evaluations=20",
        "--config.gan.every=10",
        "--config.gan.hidden=(8,)",
        "--config.gan.sample_size=16",
        "--config.gan.num_constraints=5",
        f"--config.gan.mnist_path={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "Constrained GAN (mnist" in report


def test_bench_acvi_quick(tmp_path):
    out = tmp_path / "acvi.json"
    result = run_module("experiments.bench.acvi", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["dim"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[(20, "extragradient")]["time_ratio_vs_eg"] == 1.0
    assert rows[(50, "acvi")]["evaluations"] < rows[(50, "extragradient")]["evaluations"]


def test_udp_experiment_smoke(tmp_path):
    result = run_module(
        "experiments.udp",
        f"--workdir={tmp_path}",
        "--config.margin.seeds=(0,)",
        "--config.margin.steps=300",
        "--config.margin.long_steps=400",
        "--config.margin.eps_factors=(0.5,1.5)",
        "--config.slab.seeds=(0,)",
        "--config.slab.steps=100",
        "--config.slab.udp_epsilons=(0.3,)",
        "--config.moons.steps=100",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {r["method"] for r in results["margin"]}
    assert methods == {"erm", "pgd 0.5", "udp 0.5", "pgd 1.5", "udp 1.5"}
    erm = next(r for r in results["margin"] if r["method"] == "erm")
    assert 0.5 < erm["ratio"] <= 1.0 + 1e-6  # a margin ratio, never above the certified max
    assert {r["method"] for r in results["slab"]} == {"erm", "udp 0.3", "pgd 0.3"}
    for png in ("margin_ratio.png", "moons_boundaries.png"):
        assert (tmp_path / png).stat().st_size > 1000
    udp = ("udp 0.5", "udp 1.5")
    margin = {m: [r for r in results["margin"] if r["method"] == m] for m in methods}
    last = {
        m: min(r["ratio_long"] if m == "udp 1.5" else r["ratio"] for r in margin[m]) for m in udp
    }
    mean = {m: np.mean([r["ratio"] for r in rows]) for m, rows in margin.items()}
    simple = {
        m: np.mean([r["simple_shuffled"] for r in results["slab"] if r["method"] == m])
        for m in ("erm", "udp 0.3")
    }
    assert_claims(
        tmp_path,
        results,
        [
            max(last.values()) >= 0.95,
            max(mean[m] for m in udp) > mean["erm"],
            simple["udp 0.3"] > simple["erm"] + 0.05,
        ],
    )


def test_bench_udp_quick(tmp_path):
    out = tmp_path / "udp.json"
    result = run_module("experiments.bench.udp", "--quick", f"--out={out}", "--steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, k) for m in ("mlp_slab", "lenet_28x28") for k in ("erm", "udp", "pgd", "trades")
    }
    assert all(r["ms_per_step"] > 0 for r in rows)


def test_doge_experiment_smoke(tmp_path):
    result = run_module(
        "experiments.doge",
        f"--workdir={tmp_path}",
        "--config.synthetic.seeds=(0,)",
        "--config.synthetic.proxy_steps=30",
        "--config.synthetic.base_steps=30",
        "--config.corpus.steps=6",
        "--config.corpus.eval_batches=1",
        "--config.corpus.domains=('email','asyncio')",
        "--config.corpus.seeds=(0,)",
        *(a.replace("--config.", "--config.corpus.lm.") for a in TINY_LM),  # the corpus runs
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    corpus = results["corpus"]["seeds"][0]
    assert set(corpus["perplexity"]) == {"uniform", "doge", "doremi"}
    assert set(corpus["perplexity"]["doge"]) == {"email", "asyncio", "urllib"}
    assert sum(corpus["weights"]["doge"].values()) == pytest.approx(1.0, abs=1e-5)
    for png in ("synthetic_weights.png", "corpus_weights.png"):
        assert (tmp_path / png).stat().st_size > 1000
    loss = {
        m: np.mean([r["target_loss"][m] for r in results["synthetic"]])
        for m in ("uniform", "doge-ood", "doremi")
    }
    target = results["corpus"]["target"]
    perplexity = {
        m: np.mean([r["perplexity"][m][target] for r in results["corpus"]["seeds"]])
        for m in ("uniform", "doge", "doremi")
    }
    assert_claims(
        tmp_path,
        results,
        [
            loss["doge-ood"] < min(loss["uniform"], loss["doremi"]),
            perplexity["doge"] < min(perplexity["uniform"], perplexity["doremi"]),
        ],
    )


def test_bench_doge_quick(tmp_path):
    out = tmp_path / "doge.json"
    result = run_module(
        "experiments.bench.doge",
        "--quick",
        f"--out={out}",
        "--config.corpus.domains=('email','asyncio','multiprocessing')",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {
        "plain",
        "doge",
        "doge_mixed_rows",
        "doge_selected",
        "doge_selected_mixed_rows",
        "doge_ood",
        "doremi",
    }
    assert all(r["domains"] == 3 for r in rows.values())  # the overridden corpus.domains
    assert rows["plain"]["ratio_to_plain"] == 1.0 and all(
        r["ms_per_step"] > 0 for r in rows.values()
    )
    assert record["doge_selected_to_doge"] > 0 and record["doge_selected_to_doge_mixed_rows"] > 0


def test_bench_input_pipeline_quick_with_an_overridden_seq_len(tmp_path):
    out = tmp_path / "bench.json"
    result = run_module(
        "experiments.bench.input_pipeline", "--quick", f"--out={out}", "--config.seq_len=128"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["batch_size"], data["seq_len"], data["sources"]) == (16, 128, ["embedded"])
    assert {(r["processes"], r["path"]) for r in data["results"]} == {
        (p, path) for p in (1, 2) for path in ("global", "own_rows")
    }
    for r in data["results"]:  # tokens of the host's rows, at the overridden 128 per row
        rows = 16 // r["processes"]
        assert r["tokens_per_s"] == pytest.approx(rows * 128 * 3 / r["seconds"])


def test_time_calls_warms_up_then_times_each_call_in_seconds(monkeypatch):
    from experiments.bench import common

    clock = iter([10.0, 10.5, 20.0, 22.0, 30.0, 30.25])  # perf_counter at each start and stop
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    calls = []

    def fn():
        calls.append(len(calls))
        return np.float32(len(calls))

    timing = common.time_calls(fn, repeats=3, warmup=2)
    assert calls == [0, 1, 2, 3, 4]  # two untimed warm-up calls, then three timed ones
    assert timing.seconds == [0.5, 2.0, 0.25] and timing.median == 0.5
    assert timing.output == 5.0
    with pytest.raises(ValueError, match="repeats >= 1"):
        common.time_calls(fn, repeats=0)


def test_an_overridden_num_steps_rescales_the_run_but_not_explicit_fields():
    from configs import ademamix_lm, lm_tiny
    from experiments import run_config

    untouched = run_config.rescaled(ademamix_lm.get_config(), {"optim.learning_rate": 1e-3})
    assert untouched.eval_every == ademamix_lm.get_config().eval_every
    config = ademamix_lm.get_config()
    config.num_steps, config.eval_every = 40, 3
    config = run_config.rescaled(config, {"num_steps": 40, "eval_every": 3})
    expected = lm_tiny.with_num_steps(ademamix_lm.get_config(), 40)
    assert (config.checkpoint_every, config.optim.warmup_steps) == (40, 4)
    assert config.optim.warmup_alpha_b3 == expected.optim.warmup_alpha_b3 == 40
    assert config.eval_every == 3 and expected.eval_every == 8  # the explicit override wins


def test_bench_cotformer_quick_reports_ratios_to_both_transformers(tmp_path):
    out = tmp_path / "bench.json"
    result = run_module("experiments.bench.cotformer", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    cot, deep, shallow = "CoTFormer 2x3", "Transformer L=6", "Transformer L=2"
    assert list(data["rows_ms"]) == [cot, deep, shallow]
    tasks = ("train step", "decode b=1", "decode b=16")
    for ref in (deep, shallow):
        for task in tasks:
            ratio = data["ratios"][ref][task]
            assert math.isfinite(ratio) and ratio > 0
            assert ratio == pytest.approx(data["rows_ms"][cot][task] / data["rows_ms"][ref][task])
    for name, speeds in data["decode_tokens_per_s"].items():
        assert speeds["decode b=16"] == pytest.approx(
            16 * 16e3 / data["rows_ms"][name]["decode b=16"]
        )
    # The CoTFormer shares its blocks: as many parameters as the depth-L Transformer.
    assert data["parameters"][cot] == data["parameters"][shallow] < data["parameters"][deep]
    assert f"| {cot} / {deep} |" in result.stdout


def test_cotformer_experiment_smoke_reports_arms_budgets_and_claims(tmp_path):
    result = run_module(
        "experiments.cotformer_lm",
        f"--workdir={tmp_path}",
        "--config.num_steps=2",
        "--config.eval_every=2",
        "--config.checkpoint_every=2",
        "--config.log_every=2",
        "--config.seq_len=16",
        "--config.batch_size=2",
        "--config.eval_batches=1",
        "--config.eval_per_source=False",
        "--config.model.hidden_size=16",
        "--config.model.intermediate_size=32",
        "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1",
        "--config.experiment.seeds=0",
        "--decode_batch=1",
        "--decode_tokens=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {
        "seeds",
        "seq_len",
        "steps",
        "arms",
        "paper",
        "decode_reference",
        "claims",
        "claims_rule",
    }
    arms = results["arms"]
    standard, deeper, but, cot = (
        "Transformer L=2",
        "Transformer L=4",
        "BUT 2x3",
        "CoTFormer 2x3",
    )
    ln, adaptive = "LN-CoTFormer 1->2x3->1", "adaptive LN-CoTFormer 1->2x3->1"
    assert list(arms) == [standard, deeper, but, cot, ln, adaptive]
    for arm in arms.values():
        assert len(arm["perplexity"]["per_seed"]) == 1 and arm["perplexity"]["spread"] == 0.0
        assert all(math.isfinite(arm[k]) for k in ("decode_tokens_per_s", "macs", "cache_bytes"))
        assert math.isfinite(arm["perplexity"]["mean"])
    budgets = arms[adaptive]["budgets"]
    assert [b["budget"] for b in budgets] == [
        [0.0, 0.0],
        [0.5, 0.0],
        [1.0, 0.0],
        [1.0, 0.5],
        [1.0, 1.0],
    ]
    assert all(math.isfinite(b["perplexity"]["mean"]) for b in budgets)
    macs = [b["macs"] for b in budgets]
    assert macs == sorted(macs) and macs[-1] == arms[adaptive]["macs"]
    # Cross-repeat attention costs MACs and cache (3 repeats' K/V); the blocks are shared.
    assert arms[cot]["macs"] > arms[but]["macs"] > arms[standard]["macs"]
    assert arms[cot]["parameters"] == arms[standard]["parameters"]
    assert arms[cot]["cache_bytes"] > arms[standard]["cache_bytes"]
    assert list(results["decode_reference"]) == ["Transformer L=6 (untrained)"]
    # Residual scales: embedding + each layer, or + reserved blocks and repeats; a freshly
    # initialised norm (scale 1) after every LN-CoTFormer repeat gives a stream of RMS 1.
    depths = {standard: 3, deeper: 5, but: 4, cot: 4, ln: 6, adaptive: 6}
    for name, depth in depths.items():
        for when in ("init", "trained"):
            assert len(arms[name]["residual_rms"][when]) == depth, (name, when)
    np.testing.assert_allclose(arms[ln]["residual_rms"]["init"][2:5], 1.0, atol=0.03)  # norm eps
    assert arms[cot]["residual_rms"]["init"][-1] < 0.5

    def beats(a, b):
        return b["mean"] - a["mean"] > max(a["spread"], b["spread"])

    p = {n: a["perplexity"] for n, a in arms.items()}
    expected = [
        beats(p[cot], p[but]),
        p[ln]["mean"] <= p[deeper]["mean"] + max(p[ln]["spread"], p[deeper]["spread"]),
        beats(budgets[-1]["perplexity"], budgets[0]["perplexity"]),
    ]
    assert_claims(tmp_path, results, expected)
    report = (tmp_path / "REPORT.md").read_text()
    assert f"| {cot} | 8," in report and "27.07 (12x3, Table 1)" in report
    assert "| (1.0, 0.5) |" in report and "[secondary, not in the paper]" in report
    assert "## Residual scale" in report
    assert (tmp_path / "perplexity_vs_macs.png").stat().st_size > 1000


def test_doge_claims_without_corpus_runs_say_not_measured():
    from experiments import doge

    synthetic = [
        dict(target_loss={"doge-ood": 1.0, "uniform": 1.5, "doremi": 1.2}),
        dict(target_loss={"doge-ood": 1.1, "uniform": 1.4, "doremi": 1.3}),
    ]
    first, corpus = doge.claims(dict(synthetic=synthetic, corpus=None))
    assert first.verdict == "holds"  # 1.05 < min(1.45, 1.25)
    assert corpus.verdict == "not measured" and "corpus.steps = 0" in corpus.ours
