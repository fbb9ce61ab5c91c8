"""The GPU check's markdown report, rendered from its JSON figures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.pop("DECONFLOW_FAULT", None)  # train() also reads faults from the environment


from bench.gpu_common import (  # noqa: E402
    HESS_TOL_REL,
    N_HESS,
    N_NOISE,
    N_VAL,
    RUN_STEPS,
    SECTION_NAMES,
    SIZES,
    SPE_FULL,
)

# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _f(x, fmt: str = ".2f", none: str = "n/a") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    try:
        return format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def ctx_warm_steps(R: dict) -> int:
    quick = R["sections"].get("env", {}).get("quick")
    return SIZES["quick" if quick else "full"]["share_warm"]


def render_md(R: dict) -> str:
    S = R["sections"]
    env = S.get("env", {})
    L = ["# GPU figures (issue 15)", ""]
    L.append(
        f"- GPU: **{env.get('gpu') or env.get('cpu') or 'n/a'}** "
        f"({env.get('gpu_memory_gb', 'n/a')} GB, "
        f"cc {env.get('gpu_capability', 'n/a')}); torch {env.get('torch')}, CUDA "
        f"{env.get('cuda_runtime')}, "
        f"cuDNN {env.get('cudnn')}, triton {env.get('triton')}, Python {env.get('python')}"
    )
    L.append(f"- Date (UTC): {env.get('date_utc')}; git {env.get('git_head')}")
    L.append(f"- Command: `{env.get('command')}`")
    L.append(
        f"- bf16 dense peak for MFU: {_f(env.get('bf16_peak_tflops'), '.0f')} TFLOP/s "
        f"({env.get('bf16_peak_source')}); "
        f"model: {_f(env.get('train_gflop_per_image'))} GFLOP/image (fwd+bwd = 3 x fwd), "
        f"{_f(env.get('run_50ep_pflop'))} PFLOP per 50-epoch run, floor at peak "
        f"{_f(env.get('run_50ep_floor_s_at_peak'), '.1f')} s"
    )
    L.append(
        f"- Precision defaults: cudnn.allow_tf32={env.get('cudnn_allow_tf32')}, "
        f"matmul.allow_tf32={env.get('matmul_allow_tf32')}, "
        f"cudnn.benchmark={env.get('cudnn_benchmark')}"
    )
    if env.get("quick"):
        L.append("- **QUICK MODE**: tiny sizes, figures are smoke-test values only")
    if env.get("forbidden_modules_loaded"):
        L.append(f"- WARNING: training imports loaded {env['forbidden_modules_loaded']}")
    if env.get("import_errors"):
        L.append(f"- Import errors: {env['import_errors']}")
    L.append("")
    L.append("| section | status | seconds |")
    L.append("|---|---|---|")
    for name in SECTION_NAMES:
        r = S.get(name, {})
        st = r.get("status", "not run")
        if st == "error":
            st = f"error: {r.get('error', '')[:100]}"
        elif st == "skipped":
            st = f"skipped: {r.get('reason', '')}"
        L.append(f"| {name} | {st} | {_f(r.get('seconds'), '.0f')} |")
    L.append("")

    tp = S.get("throughput", {})
    if tp:
        L += [
            f"## Training throughput (synthetic CIFAR-shaped data, batch {env.get('batch')}, "
            "ResNet-18)",
            "",
        ]
        L.append(
            "| path | ms/step | img/s | s per 50-epoch run (training only) | TFLOP/s | MFU | "
            "first step s | peak mem GB |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        labels = {
            "fp32_eager": "fp32, eager",
            "fast_eager": "channels_last + bf16, eager",
            "fast_compiled": "channels_last + bf16 + torch.compile (the fast path)",
            "proposed_fast_cudnn_benchmark": "PROPOSED: fast path + cudnn.benchmark=True",
        }
        for k, lab in labels.items():
            m = tp.get(k)
            if not m:
                continue
            if "step_ms" not in m:
                L.append(f"| {lab} | {m.get('error') or m.get('skipped')} | | | | | | |")
                continue
            L.append(
                f"| {lab} | {_f(m['step_ms'])} | {_f(m['img_s'], ',.0f')} | "
                f"{_f(m['run_50ep_train_s'], ',.0f')} | "
                f"{_f(m.get('achieved_tflops'), '.1f')} | {_f(m.get('mfu_pct'), '.1f')}% | "
                f"{_f(m.get('first_step_s'), '.1f')} | "
                f"{_f(m.get('peak_mem_gb'))} |"
            )
        L.append("")
        L.append(
            f"Speed-up of the fast path over fp32: x{_f(tp.get('speedup_fast_vs_fp32'))}. "
            f"50 epochs x {SPE_FULL} steps = {RUN_STEPS:,} steps; steady state after warm-up, "
            "timed with "
            "torch.cuda.synchronize."
        )
        L.append("")

    mo = S.get("monitors", {})
    if mo:
        L += ["## Monitors (fast-path model)", ""]
        L.append("| monitor | variant | first call s | steady s | x per run | note |")
        L.append("|---|---|---|---|---|---|")
        for k, v in mo.get("validation", {}).items():
            note = ""
            if "val_loss_abs_diff_vs_as_implemented" in v:
                note = (
                    f"val loss diff {v['val_loss_abs_diff_vs_as_implemented']:.1e}, "
                    f"acc diff {v['val_acc_abs_diff_vs_as_implemented']:.1e}"
                )
            L.append(
                f"| validation ({mo.get('n_test')} images) | {k} | {_f(v.get('first_call_s'))} | "
                f"{_f(v.get('seconds'), '.3f', v.get('error') or v.get('skipped') or 'n/a')} | "
                f"{N_VAL} | {note} |"
            )
        for k, v in mo.get("hessian", {}).items():
            note = ""
            if "lambda_rel_diff_vs_fp32" in v:
                note = (
                    f"rel diff vs fp32: lambda {v['lambda_rel_diff_vs_fp32']:.1e}, "
                    f"trace {v['trace_rel_diff_vs_fp32']:.1e}"
                )
            L.append(
                f"| Hessian lambda_max + trace | {k} | {_f(v.get('first_call_s'))} | "
                f"{_f(v.get('seconds'), '.3f', v.get('error') or v.get('skipped') or 'n/a')} | "
                f"{N_HESS} | {note} |"
            )
        gn = mo.get("grad_noise", {})
        L.append(
            f"| gradient noise | as_implemented | {_f(gn.get('first_call_s'))} | "
            f"{_f(gn.get('seconds'), '.3f', gn.get('error', 'n/a'))} | {N_NOISE} | |"
        )
        ck = mo.get("checkpoint", {})
        L.append(
            "| checkpoint latest.pt (not a monitor) | as_implemented | "
            f"{_f(ck.get('first_call_s'))} | "
            f"{_f(ck.get('seconds'), '.3f', ck.get('error', 'n/a'))} | {N_VAL} | "
            f"{_f((ck.get('bytes') or 0) / 1e6, '.0f')} MB |"
        )
        L.append("")
        o = mo.get("overhead", {})
        if "as_implemented" in o:
            L.append(
                "Overhead for a 50-epoch run, in % of the fast path's training time "
                f"({_f(o['train_s_fast_path'], ',.0f')} s):"
            )
            L.append("")
            L.append("| | validation | Hessian | gradient noise | total | within 15% |")
            L.append("|---|---|---|---|---|---|")
            for lab, key in (("as implemented", "as_implemented"), ("PROPOSED", "proposed")):
                x = o[key]
                L.append(
                    f"| {lab} | {_f(x['validation_pct'], '.1f')}% | {_f(x['hessian_pct'], '.1f')}% "
                    "| "
                    f"{_f(x['grad_noise_pct'], '.1f')}% | **{_f(x['total_pct'], '.1f')}%** "
                    f"({_f(x['total_s'], ',.0f')} s) | "
                    f"{x['within_15pct_budget']} |"
                )
            p = o["proposed"]
            L.append("")
            L.append(
                f"Proposed = validation `{p.get('validation_variant')}`, Hessian "
                f"`{p.get('hessian_variant')}`. "
                "Checkpoint writes (latest.pt at every validation point) add "
                f"{_f(o.get('checkpoint_latest_pct'), '.1f')}%."
            )
        elif o.get("error"):
            L.append(f"Overhead: {o['error']}")
        L.append("")

    me = S.get("memory", {})
    if me.get("per_variant"):
        L += [f"## GPU memory per variant (batch {env.get('batch')})", ""]
        L.append("| variant / path | train step peak GB | Hessian probe peak GB | params (M) |")
        L.append("|---|---|---|---|")
        for k, v in me["per_variant"].items():
            if "error" in v or "skipped" in v:
                L.append(f"| {k} | {v.get('error') or v.get('skipped')} | | |")
                continue
            L.append(
                f"| {k} | {_f(v['train_step_peak_gb'])} | {_f(v['hessian_peak_gb'])} | "
                f"{_f(v['params_m'])} |"
            )
        if "base_fast_compiled_train_peak_gb" in me:
            L.append(f"| base/fast_compiled | {_f(me['base_fast_compiled_train_peak_gb'])} | | |")
        L.append("")
        if me.get("note"):
            L.append(me["note"])
        if "max_process_estimate_gb" in me:
            L.append(
                f"Largest process estimate: {_f(me['max_process_estimate_gb'])} GB "
                f"(peak {_f(me['max_peak_gb'])} + dataset {_f(me['dataset_on_device_gb'])} + ~0.5 "
                "context); "
                f"within the plan's 6 GB: {me['within_plan_6gb']}."
            )
        L.append("")

    pr = S.get("profiler", {})
    if pr.get("top10"):
        L += [f"## Profiler: {pr.get('what')} ({pr.get('steps')} steps, {pr.get('path')})", ""]
        L.append(
            f"Wall {_f(pr.get('wall_ms_per_step'))} ms/step under the profiler; kernels "
            f"{_f(pr.get('kernel_ms_per_step'))} ms/step (GPU busy "
            f"~{_f(100 * pr.get('kernel_busy_fraction', 0), '.0f')}%); "
            f"{_f(pr.get('kernel_launches_per_step'), '.0f')} launches/step."
        )
        L.append("")
        L.append("| # | kernel | calls | self ms/step | % |")
        L.append("|---|---|---|---|---|")
        for i, r in enumerate(pr["top10"], 1):
            name = r["name"].replace("|", "/")[:110]
            L.append(
                f"| {i} | `{name}` | {r['calls']} | {_f(r['self_ms_per_step'], '.3f')} | "
                f"{_f(r['pct'], '.1f')} |"
            )
        L.append("")
        L.append(
            "By kind: " + ", ".join(f"{k} {v:.1f}%" for k, v in pr.get("by_kind_pct", {}).items())
        )
        L.append("")
        if pr.get("table"):
            L += [
                "<details><summary>profiler table</summary>",
                "",
                "```",
                pr["table"],
                "```",
                "",
                "</details>",
                "",
            ]

    co = S.get("correctness", {})
    if co.get("train_loss"):
        tl = co["train_loss"]
        L += ["## Correctness: fast path vs fp32 (same seed, same data, real train())", ""]
        L.append(f"Config: {co.get('config')}; train() seconds: {co.get('train_seconds')}")
        L.append("")
        L.append(
            f"- Train loss, first {tl['steps_compared']} steps: step-1 |diff| "
            f"{tl['step1_abs_diff']:.2e}; "
            f"per step max |diff| {tl['max_abs_diff']:.4f} nats (mean {tl['mean_abs_diff']:.4f}, "
            f"max rel {tl['max_rel_diff']:.3%}); "
            f"{tl['window']}-step window means max |diff| {_f(tl['window_max_abs_diff'], '.4f')}; "
            f"smoothed ({tl['smoothing']}) max |diff| {tl['smoothed_max_abs_diff']:.4f} (rel "
            f"{tl['smoothed_max_rel_diff']:.3%}). "
            f"Tolerance: {tl['tolerance']} -> **{'PASS' if tl['pass'] else 'FAIL'}**"
        )
        L.append(
            f"  - window means fp32 {[round(x, 4) for x in tl['window_means_fp32']]}, fast "
            f"{[round(x, 4) for x in tl['window_means_fast']]}"
        )
        hs = co.get("hessian_same_weights", {})
        if hs:
            L.append(
                f"- Hessian on the same weights (fp32 run, step {hs.get('at_step')}), same probes; "
                f"{hs.get('tolerance')}:"
            )
            for k in ("fp32", "fast_path_as_implemented", "bf16_autocast"):
                v = hs.get(k, {})
                extra = ""
                if "lambda_rel_diff" in v:
                    extra = (
                        f" (rel diff lambda {v['lambda_rel_diff']:.2e}, trace "
                        f"{v['trace_rel_diff']:.2e}) -> {'PASS' if v['pass'] else 'FAIL'}"
                    )
                L.append(
                    f"  - {k}: lambda_max {_f(v.get('lambda_max'), '.5g')}, trace "
                    f"{_f(v.get('trace'), '.5g')}{extra}"
                )
        if co.get("hessian_in_run"):
            L.append(
                "- In-run Hessian (informational, not judged: each run measures its own weights, "
                "which drift apart over the steps, and Hutchinson estimates with few probes are "
                "noisy):"
            )
        for e in co.get("hessian_in_run", []):
            L.append(
                f"  - step {e['step']}: lambda_max fp32 {e['lambda_fp32']:.5g} vs fast "
                f"{e['lambda_fast']:.5g} (rel {e['lambda_rel_diff']:.2e}); trace "
                f"{e['trace_fp32']:.5g} vs {e['trace_fast']:.5g} (rel {e['trace_rel_diff']:.2e}); "
                f"finite {e['finite']}"
            )
        if co.get("val_loss_last"):
            L.append(f"- Last val loss: {co['val_loss_last']}")
        L.append(
            f"- Hessian verdict (fast path on the same weights within {HESS_TOL_REL:.0%}, all "
            f"values finite): **{'PASS' if co.get('hessian_pass') else 'FAIL'}**"
        )
        L.append("")

    sh = S.get("sharing", {})
    if sh.get("solo_img_s"):
        L += ["## Two runs sharing one GPU", ""]
        L.append(
            f"Fast path ({sh.get('path')}), two processes, {sh.get('measure_seconds')} s windows: "
            "one alone "
            f"**{sh['solo_img_s']:,.0f} img/s**; both at once {sh['pair'][0]['img_s']:,.0f} + "
            f"{sh['pair'][1]['img_s']:,.0f} = "
            f"**{sh['pair_aggregate_img_s']:,.0f} img/s** -> aggregate "
            f"**x{sh['aggregate_ratio_2_vs_1']:.2f}** "
            f"(each run x{sh['per_run_slowdown']:.2f} slower). Process memory (max reserved): "
            f"{[p.get('max_reserved_gb') for p in sh['pair']]} GB."
        )
        L.append("")
        L.append(
            f"Start-up of a training process (two at once: interpreter, torch import, data, "
            f"{'torch.compile from the warm cache, ' if 'compile' in sh.get('path', '') else ''}"
            f"{ctx_warm_steps(R)} warm-up steps): "
            f"{_f(sh.get('workers_ready_s'), '.1f')} s."
        )
        L.append("")

    rs = S.get("resume", {})
    if rs.get("verdict"):
        L += ["## Resume after a crash (real train())", ""]
        L.append(f"Config: {rs.get('config')}")
        L.append("")
        c = rs.get("resumed_vs_uninterrupted", {})
        L.append(
            f"- Crash: `{rs.get('crash')}`; rows kept to step {rs.get('rows_after_crash')}; "
            "resumed run attempts "
            f"{rs.get('resumed_attempts')}, outcome {rs.get('resumed_outcome')}"
        )
        for fam in ("batch_metrics", "val_metrics", "curvature_metrics", "noise_metrics"):
            v = c.get(fam, {})
            cols = {k: x for k, x in v.items() if isinstance(x, dict)}
            L.append(
                f"- {fam}: rows {v.get('rows')}, same steps {v.get('same_steps')}; "
                + ", ".join(
                    f"{k} exact={x['exact']} max|d|={x['max_abs_diff']:.2e}"
                    for k, x in cols.items()
                )
            )
        L.append(
            f"- Uninterrupted vs uninterrupted (nondeterminism floor): max |d| train loss "
            f"{_f(rs.get('nondeterminism_floor_loss_max_abs_diff'), '.2e')}"
        )
        L.append(f"- Tolerance: {rs.get('tolerance')} -> **{rs['verdict']}**")
        L.append("")

    e2 = S.get("e2e", {})
    if e2.get("epoch_s"):
        L += ["## End to end: real train() with every monitor", ""]
        L.append(f"Config: {e2.get('config')}")
        L.append("")
        L.append(
            f"- Epoch times: {[round(x, 2) for x in e2['epoch_s']]} s (first includes data, "
            "compile, first validation)"
        )
        if "steady_epoch_s" in e2:
            L.append(
                f"- Steady epoch {e2['steady_epoch_s']:.2f} s; corrected to the average monitor "
                "rate "
                f"{e2['steady_epoch_s_rate_corrected']:.2f} s ({e2['window_monitor_counts']}); "
                "training alone "
                f"{_f(e2.get('train_only_epoch_s'))} s -> loop + monitors + checkpoints add "
                f"{_f(e2.get('loop_overhead_pct'), '.0f')}%"
            )
            L.append(
                f"- **50-epoch run with monitors: {e2['run_50ep_s']:.0f} s** (first epoch + 49 "
                "steady); "
                f"{e2['run_50ep_s_amortized_no_startup']:.0f} s amortized without startup. Goal <= "
                "60 s: "
                f"{e2['goal_60s']}; moonshot <= 40 s: {e2['moonshot_40s']}"
            )
        L.append(
            f"- Peak memory of the run (allocated, incl. its dataset): {_f(e2.get('peak_mem_gb'))} "
            "GB"
        )
        L.append("")

    cg = S.get("cudagraphs", {})
    m = cg.get("fast_compiled_reduce_overhead")
    if m:
        L += ["## PROPOSED: CUDA graphs (torch.compile mode='reduce-overhead')", ""]
        L.append(
            f"{_f(m['step_ms'])} ms/step, {_f(m['img_s'], ',.0f')} img/s, 50-epoch training "
            f"{_f(m['run_50ep_train_s'], ',.0f')} s, "
            f"MFU {_f(m.get('mfu_pct'), '.1f')}%; "
            f"x{_f(cg.get('speedup_vs_fast_compiled_default'))} vs default compile; "
            f"first step {_f(m['first_step_s'], '.1f')} s"
        )
        L.append("")
    errs = {k: v.get("error") for k, v in S.items() if v.get("status") == "error"}
    if errs:
        L += ["## Errors", ""] + [f"- {k}: `{v}`" for k, v in errs.items()] + [""]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
