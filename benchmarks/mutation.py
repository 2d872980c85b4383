"""Mutation testing of the modules where a wrong number is silent (mutmut 3, per module, scoped to its tests).

    python benchmarks/mutation.py [--modules step,lstsq,...] [--tests-from REV] [--label after] [--max-children 2]

For each module it builds a scratch copy of the repository under ``build/mutation/<label>/<module>/`` (git-ignored),
taken from git (``--source-rev``, default HEAD; commit first): the package, the ``export/``/``kernels/`` folders its
links point to, ``pyproject.toml`` with a generated ``[tool.mutmut]`` section that mutates only that module and
selects only the tests that cover it, and ``tests/`` (from ``--tests-from`` when given, to measure an older suite
against the same code; test files and functions it lacks are left out of the selection), runs
``mutmut run`` there (optionally only on the functions listed in ``functions``), reads mutmut's per-mutant exit codes
from ``mutants/<file>.meta`` and writes ``benchmarks/mutation_<label>.json``. ``--report`` regenerates the section
"Mutation testing (issue 23)" of benchmarks/RESULTS.md from ``mutation_before.json`` and ``mutation_after.json``;
the equivalent mutants (no observable change) are listed in ``EQUIVALENT`` below with a one-line reason each.

Too slow for every CI run on 2 cores (see RESULTS.md for the time): run it by hand when the covered modules change.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Mutation testing (issue 23)"


@dataclasses.dataclass(frozen=True)
class Module:
    path: str
    tests: tuple[str, ...]
    #: mutmut function-name globs (``x_name``, ``xǁClassǁmethod``) when only part of the module is measured
    functions: tuple[str, ...] = ()
    note: str = ""


SE = "tests/test_silent_errors.py::"
MODULES: dict[str, Module] = {
    "step": Module("olss_fast/core/step.py", (
        SE + "test_ddim_coefficients_run_as_ddimscheduler_on_its_default_config",
        SE + "test_ddim_step_factors_match_the_closed_forms_in_float64", SE + "test_step_", "tests/test_kernels.py",
        "tests/test_scheduler.py::test_ddim_schedule_in_olss_form_reproduces_ddim",
        "tests/test_scheduler.py::test_step_applies_coefficients_exactly")),
    "lstsq": Module("olss_fast/core/lstsq.py", (
        "tests/test_stats_lstsq.py", SE + "test_ridge_solve_is_the_tikhonov_solution_of_the_scaled_system",
        SE + "test_gram_fits_batched_unbatched_and_degenerate_agree_with_per_group_fits",
        SE + "test_solve_of_a_batch_mixing_regular_and_singular_groups",
        "tests/test_search.py::test_coefficient_errors_of_fitted_coeffs_equal_reported_errors"),
        functions=("x_gram_lstsq", "x_solve_spd"),
        note="the fit and the guarded solve (not the pseudo-inverse fallback or the rank helper)"),
    "stats": Module("olss_fast/core/stats.py", (
        "tests/test_stats_lstsq.py", "tests/test_stats_rules.py", SE + "test_gram_statistics_",
        "tests/test_schedule_io.py::test_merging_different_teachers_is_refused",
        "tests/test_schedule_io.py::test_stats_round_trip",
        "tests/test_hostile_inputs.py::test_merging_never_counts_a_sample_twice"),
        functions=("xǁGramStatsǁ_check_compatible", "xǁGramStatsǁ_check_disjoint", "xǁGramStatsǁ__add__",
                   "xǁGramStatsǁmerge_", "xǁGramStatsǁupdate", "xǁGramStatsǁglobal_gram", "xǁGramStatsǁx_index",
                   "xǁGramStatsǁe_index"),
        note="the Gram accumulation, its indexing, the merge rules and the merged sums"),
    "search": Module("olss_fast/core/search.py", ("tests/test_search.py", SE + "test_minimax_search_falls_back",
                                                  SE + "test_minimax_path_is_the_brute_force_optimum",
                                                  SE + "test_search_schedule_labels_explicit_paths"),
        functions=("x_search_schedule", "x_paper_schedule", "x_minimax_path", "x__greedy", "x_uniform_path",
                   "xǁ_Fitterǁfit", "xǁ_Fitterǁpath_fit"),
        note="the fits, the path searches and the fallback"),
    "refine": Module("olss_fast/core/refine.py", (
        "tests/test_refine.py", "tests/test_refine_rules.py", SE + "test_refit_ridge",
        "tests/test_refit_search.py::test_programme_is_exact_for_two_steps_and_reports_the_refit_error"),
        functions=("x_sequential_refit", "xǁRefitStateǁfit", "xǁRefitStateǁadd_output", "x_path_targets"),
        note="the re-fit's per-step fit, its Gram bookkeeping and driver"),
    "schedule": Module("olss_fast/core/schedule.py",
                       ("tests/test_schedule_io.py", "tests/test_schedule_rules.py"),
        functions=("xǁOLSSScheduleǁvalidate", "x__coeff_tensor"),
        note="the validation of a schedule and of its coefficients"),
    "scheduler": Module("olss_fast/serve/scheduler.py",
                        ("tests/test_scheduler.py", "tests/test_scheduler_rules.py"),
        functions=("xǁOLSSSchedulerǁ_olss_step", "xǁOLSSSchedulerǁddim_schedule", "xǁOLSSSchedulerǁ_select_searched"),
        note="the OLSS step, DDIM's schedule in OLSS form and the selection of a searched schedule"),
    "provenance": Module("olss_fast/core/provenance.py", (
        SE + "test_noise_schedule_id_tells_zero_snr_rescaling_apart",
        SE + "test_same_model_class_with_another_config_is_refused_not_a_fine_tune",
        SE + "test_provenance_values_compare_with_their_own_rules", SE + "test_compare_",
        "tests/test_scheduler.py::test_schedule_fitted_for_another_noise_schedule_or_parametrisation_is_refused",
        "tests/test_runtime.py::test_prediction_type_mismatch_is_refused_unless_allowed",
        "tests/test_use_and_follow.py::test_use_olss_scheduler_checks_what_the_plain_swap_cannot",
        "tests/test_use_and_follow.py::test_a_plain_swap_says_once_what_it_cannot_check_and_warns_at_another_size",
        "tests/test_hostile_inputs.py::test_fit_refuses_a_teacher_on_another_noise_schedule_before_any_work"),
        functions=("x_compare", "x_same_value", "x__same"),
        note="the comparison of fitted_for with the use"),
    "files": Module("olss_fast/core/files.py", (
        SE + "test_json_nesting_is_limited_well_below_pythons_own_recursion_limit",
        SE + "test_stale_temporaries_of_a_dead_writer_are_removed_and_live_ones_kept",
        SE + "test_json_value_and_container_counts_are_bounded_exactly",
        SE + "test_foreign_temporaries_are_stale_only_when_older_than_the_limit",
        SE + "test_json_text_rules_each_refuse_with_their_own_message",
        SE + "test_stale_temporary_folders_are_removed_and_links_only_unlinked",
        "tests/test_trust_writers.py::test_temporaries_of_live_writers_elsewhere_are_kept",
        "tests/test_trust_writers.py::test_lock_files_are_never_followed_or_truncated",
        "tests/test_trust_writers.py::test_writers_refuse_fifos_and_devices",
        "tests/test_schedule_io.py"),
        functions=("x_parse_json", "x__depth", "x_clean_stale_temporaries", "x__is_stale"),
        note="the JSON rules, the temporaries and their clean-up"),
    "runner": Module("olss_fast/serve/backend.py", (
        SE + "test_program_state", "tests/test_runtime.py::test_update_schedule_with_other_timesteps_equals_a_fresh_runner",
        "tests/test_runtime.py::test_sd_update_schedule", "tests/test_runtime.py::test_digits_eager_matches_pipeline"),
        functions=("xǁProgramStateǁ*", "x_timesteps_tensor"),
        note="the runner's schedule handling: ProgramState (create, load) and the timestep tensor"),
}

#: surviving mutants with no observable change: mutmut name -> reason (checked by reading each diff)
EQUIVALENT: dict[str, str] = {
    "olss_fast.core.step.x_unroll_linear_steps__mutmut_24":
        "`row[j + 1] = B` for `+= B`: entry j+1 is still zero when step j adds B (only 0..j are set before)",
    "olss_fast.core.step.x_ddim_coefficients__mutmut_4":
        "`.to(None)` keeps ᾱ in float32: `float()` of a float32 element equals that of its exact float64 copy",
    "olss_fast.core.step.x_coeff_row__mutmut_2":
        "`device=None`: equivalent where every tensor is on the CPU (the only device of this run)",
    "olss_fast.core.step.x_coeff_row__mutmut_4":
        "`device=` dropped: equivalent where every tensor is on the CPU (the only device of this run)",
    **{f"olss_fast.serve.backend.{name}": "device argument dropped or None: equivalent where every tensor is on the "
       "CPU (the only device of this run; the gpu tests of tests/test_runtime.py cover it)" for name in (
           "xǁProgramStateǁcreate__mutmut_9", "xǁProgramStateǁcreate__mutmut_11", "xǁProgramStateǁcreate__mutmut_14",
           "xǁProgramStateǁcreate__mutmut_20", "xǁProgramStateǁcreate__mutmut_24", "xǁProgramStateǁload__mutmut_11",
           "x_timesteps_tensor__mutmut_5", "x_timesteps_tensor__mutmut_8")},
    **{f"olss_fast.core.provenance.x_compare__mutmut_{i}": "the first element of a one-time-warning key only keeps "
       "fine-tune keys apart from mismatch keys; another distinct constant does the same" for i in (62, 63, 142, 143)},
    **{f"olss_fast.core.lstsq.x_gram_lstsq__mutmut_{i}": "index dtype dropped or None: `torch.as_tensor` of Python "
       "ints is int64 anyway" for i in (6, 9)},
    **{f"olss_fast.core.lstsq.{n}": "device argument dropped or None: equivalent where every tensor is on the CPU "
       "(the only device of this run)" for n in ("x_gram_lstsq__mutmut_7", "x_gram_lstsq__mutmut_10",
                                                 "x_solve_spd__mutmut_39", "x_solve_spd__mutmut_42")},
    "olss_fast.core.lstsq.x_solve_spd__mutmut_44":
        "`shape[-2]` for `shape[-1]` of a square matrix: the same size",
    "olss_fast.core.lstsq.x_solve_spd__mutmut_71":
        "`clamp_min(1.0)`: the largest Cholesky diagonal of the unit-diagonal scaled matrix is L00 = √(1 + ridge) ≥ 1",
    "olss_fast.core.files.x_parse_json__mutmut_26":
        "`max_values / 8` for `// 8`: for an integer count c, c > n // 8 and c > n / 8 agree",
    "olss_fast.core.files.x_parse_json__mutmut_37":
        "`decode(\"UTF-8\")` for `decode(\"utf-8\")`: codec names are case-insensitive",
    "olss_fast.core.files.x__depth__mutmut_4":
        "`deepest = 1` for `0`: the first item popped (depth 1) sets it to 1 anyway",
    "olss_fast.serve.backend.xǁProgramStateǁcreate__mutmut_19":
        "`torch.full` of a Python float without `dtype` gives the default dtype, float32, as asked",
    "olss_fast.serve.backend.xǁProgramStateǁcreate__mutmut_23":
        "`torch.full` of a Python float without `dtype` gives the default dtype, float32, as asked",
    "olss_fast.serve.backend.xǁProgramStateǁload__mutmut_19":
        "`.to(None)`: `copy_` into the float32 buffer converts the float64 coefficients anyway",
    "olss_fast.serve.backend.x_timesteps_tensor__mutmut_4":
        "`dtype=None`: torch infers int64 for Python ints and the default float32 for floats, the same types",
    "olss_fast.serve.backend.x_timesteps_tensor__mutmut_7":
        "`dtype` dropped: torch infers int64 for Python ints and the default float32 for floats, the same types",
    **{f"olss_fast.core.schedule.{n}": "`>=` for `>` against MAX_COEFFS = 2^21: C·n·(n+1) = 2^21 needs n(n+1) to be "
       "a power of two, i.e. n = 1 and C = 2^20 channels, which the channel bound (4096) refuses first"
       for n in ("x__coeff_tensor__mutmut_32", "xǁOLSSScheduleǁvalidate__mutmut_49")},
    **{f"olss_fast.core.refine.xǁRefitStateǁfit__mutmut_{i}": "an extra zero row or column of the Gram buffer "
       "(m + 2 for m + 1): gram_lstsq reads only the indices 0 … m" for i in (20, 22)},
    **{f"olss_fast.core.refine.xǁRefitStateǁfit__mutmut_{i}": "`keepdim` dropped: gram_lstsq fits an unbatched "
       "Gram matrix alike and the coefficient row broadcasts into the single group" for i in (44, 46)},
    "olss_fast.core.refine.xǁRefitStateǁfit__mutmut_6":
        "`history[: j + 2]` for `[: j + 1]`: row j is fitted when the history holds exactly e_0 … e_j",
    "olss_fast.serve.scheduler.xǁOLSSSchedulerǁ_olss_step__mutmut_25":
        "`float(timestep)` of a tensor timestep: `float()` of a one-element tensor is its item",
    "olss_fast.serve.scheduler.xǁOLSSSchedulerǁ_olss_step__mutmut_30":
        "`j >= 0` for `j > 0`: at j = 0 the branch is reached only when t differs from timesteps[0]",
    "olss_fast.serve.scheduler.xǁOLSSSchedulerǁ_olss_step__mutmut_58":
        "model outputs kept in their own dtype: olss_combine converts each to x0's float32, exactly as the append did",
    **{f"olss_fast.serve.scheduler.xǁOLSSSchedulerǁ_olss_step__mutmut_{i}": "the finished trajectory's history / "
       "last output set to another empty value: the next step starts a new trajectory, which resets both first"
       for i in (80, 81)},
    **{f"olss_fast.serve.scheduler.xǁOLSSSchedulerǁ_select_searched__mutmut_{i}": "timestep / sigma dtype dropped "
       "or None: torch infers int64 for Python ints and the default float32 for floats, the types asked for"
       for i in (134, 137, 144, 146)},
    **{f"olss_fast.serve.scheduler.xǁOLSSSchedulerǁ_select_searched__mutmut_{i}": "device argument dropped or None: "
       "equivalent where every tensor is on the CPU (the only device of this run)" for i in (135, 138, 148)},
    **{f"olss_fast.serve.scheduler.xǁOLSSSchedulerǁ_select_searched__mutmut_{i}": "`rtol=1e-5` dropped: numpy's "
       "default rtol is 1e-5" for i in (37, 47)},
    **{f"olss_fast.serve.scheduler.xǁOLSSSchedulerǁ_select_searched__mutmut_{i}": "the first element of a one-time-"
       "warning key only keeps it apart from other warnings' keys; another distinct constant does the same"
       for i in (96, 97)},
    **{f"olss_fast.core.stats.xǁGramStatsǁ{n}": "device argument dropped or None: equivalent where every tensor is "
       "on the CPU (the only device of this run)" for n in ("merge___mutmut_16", "merge___mutmut_21",
                                                            "update__mutmut_136", "update__mutmut_141",
                                                            "update__mutmut_212")},
    **{f"olss_fast.core.stats.xǁGramStatsǁupdate__mutmut_{i}": "another chunk size: memory use and the float64 "
       "summation order change, the sums only by float64 rounding (tests/test_stats_rules.py checks a chunking of "
       "2 samples against the whole batch)" for i in (118, 124, 130)},
    "olss_fast.core.stats.xǁGramStatsǁ__add____mutmut_7":
        "`disjoint=True` in `a + b`'s own check: the merge_ it calls next checks again with disjoint=False and "
        "refuses item-less statistics with the same message",
    "olss_fast.core.stats.xǁGramStatsǁupdate__mutmut_164": "`dim=0` dropped: it is torch.cat's default",
    "olss_fast.core.stats.xǁGramStatsǁ__add____mutmut_4":
        "`disjoint=None` for `False` in `a + b`: both are falsy, so item-less statistics are refused alike",
    "olss_fast.core.search.x__greedy__mutmut_32":
        "`(lo + hi + 2) // 2`: for lo < hi it is still in (lo, hi], and any such midpoint finds the same largest "
        "admissible index",
    "olss_fast.core.search.x_minimax_path__mutmut_1":
        "`iters=61`: the bisection stops at its relative tolerance 1e-12 after ~40 halvings, before either count",
    **{f"olss_fast.core.search.xǁ_Fitterǁfit__mutmut_{i}": "the fit cache disabled (nothing stored, or nothing "
       "found): every fit is computed again, the same numbers, only slower" for i in (3, 4, 22)},
    **{f"olss_fast.serve.scheduler.xǁOLSSSchedulerǁddim_schedule__mutmut_{i}": "`teacher_steps` None or dropped: "
       "OLSSSchedule then takes the last index + 1, which is len(ts) on this path 0 … n−1" for i in (39, 47)},
}


#: the hand-planted bugs of the issue: (bug, the test that kills it); each passed the suite at main and fails it now
HAND_MUTANTS = [
    ("step.ddim_coefficients: end of sampling at `tp > 0` instead of `tp >= 0`",
     "test_silent_errors::test_ddim_coefficients_run_as_ddimscheduler_on_its_default_config, "
     "test_scheduler::test_ddim_schedule_in_olss_form_reproduces_ddim[leading-0-True-*]"),
    ("runner.update_schedule keeping the old timesteps (ProgramState.load without `timesteps.copy_`)",
     "test_runtime::test_update_schedule_with_other_timesteps_equals_a_fresh_runner"),
    ("search: minimax fallback to uniform removed (or its comparison reversed)",
     "test_silent_errors::test_minimax_search_falls_back_to_uniform_when_its_path_is_worse"),
    ("re-fit ridge sign flipped / removed (in RefitState.fit; also in lstsq.solve_spd)",
     "test_silent_errors::test_refit_ridge_is_the_tikhonov_fit_on_the_students_outputs, "
     "test_silent_errors::test_ridge_solve_is_the_tikhonov_solution_of_the_scaled_system"),
    ("noise-schedule id ignoring `rescale_betas_zero_snr`",
     "test_silent_errors::test_noise_schedule_id_tells_zero_snr_rescaling_apart"),
    ("same class, other config treated as a fine-tune",
     "test_silent_errors::test_same_model_class_with_another_config_is_refused_not_a_fine_tune"),
    ("JSON depth limit removed", "test_silent_errors::test_json_nesting_is_limited_well_below_pythons_own_recursion_limit"),
    ("GramStats merging another model / prediction type / context",
     "test_silent_errors::test_gram_statistics_of_another_setting_never_merge"),
    ("stale-temporaries clean-up removed",
     "test_silent_errors::test_stale_temporaries_of_a_dead_writer_are_removed_and_live_ones_kept, "
     "test_hostile_inputs::test_killed_writers_leave_a_whole_old_or_new_file[schedule]"),
    ("statistics-only fit far worse than DDIM on held-out noise (a defect, not a mutant)",
     "test_silent_errors::test_statistics_only_fit_is_not_far_worse_than_ddim_on_held_out_noise (strict xfail)"),
]


def _extract(rev: str, paths: list[str], dst: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *paths], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def _copy_tree(dst: Path, source_rev: str, tests_from: str | None) -> None:
    """The package (with the export/ and kernels/ folders its links point to) at ``source_rev`` and tests/ at
    ``tests_from`` (default: the same revision), from git: never the working tree, which may be mid-edit."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    _extract(source_rev, ["olss_fast", "export", "kernels", "pyproject.toml"], dst)
    _extract(tests_from or source_rev, ["tests"], dst)


def _exists(work: Path, test: str) -> bool:
    """Whether a test file (or ``file::function-prefix``) exists in the copy (older revisions lack new tests)."""
    path, _, name = test.partition("::")
    if not (work / path).exists():
        return False
    return not name or f"def {name}" in (work / path).read_text()


def _select(work: Path, test: str) -> list[str]:
    """pytest arguments for a test: a file, a node id, or ``file::prefix`` (every function starting with it)."""
    path, _, name = test.partition("::")
    if not name:
        return [path]
    import re

    names = re.findall(rf"^def ({re.escape(name)}\w*)\(", (work / path).read_text(), re.M)
    return [f"{path}::{n}" for n in names]


def _config(module: Module, tests: list[str], max_children: int) -> str:
    lines = ["", "[tool.mutmut]", 'source_paths = ["olss_fast"]', f"only_mutate = {json.dumps([module.path])}",
             f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
             'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]',
             'process_isolation = "forkserver"', "use_git_change_detection = false"]
    return "\n".join(lines) + "\n"


def run_module(name: str, label: str, source_rev: str, tests_from: str | None, max_children: int,
               retest: dict | None = None) -> dict:
    """``retest``: an earlier result of this module; only its survivors are run again (new tests cannot make a
    killed mutant survive), and the verdicts are merged into it."""
    module = MODULES[name]
    work = ROOT / "build" / "mutation" / label / name
    _copy_tree(work, source_rev, tests_from)
    tests = [t for t in module.tests if _exists(work, t)]
    pyproject = (work / "pyproject.toml").read_text()
    start = pyproject.find("[tool.mutmut]")
    if start >= 0:  # the repository's own section is replaced by the per-module one
        end = pyproject.find("\n[", start + 1)
        pyproject = pyproject[:start] + (pyproject[end + 1:] if end >= 0 else "")
    selection = [arg for t in tests for arg in _select(work, t)]
    (work / "pyproject.toml").write_text(pyproject + _config(module, selection, max_children))
    names = [f"{module.path[:-3].replace('/', '.')}.{f}__mutmut_*" for f in module.functions]
    run_names = names
    if retest is not None:
        from mutmut.stats import status_by_exit_code

        run_names = sorted(k for k, v in retest["exit_codes"].items()
                           if status_by_exit_code[v] in ("survived", "no tests"))
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *run_names]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (work / "mutmut_run.log").write_text(proc.stdout[-200_000:] + "\n--- stderr\n" + proc.stderr[-200_000:])
    meta = json.loads((work / "mutants" / (module.path + ".meta")).read_text())
    codes = meta.get("exit_code_by_key", {})
    if names:
        import fnmatch

        codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, n) for n in names)}
    if retest is not None:
        codes = dict(retest["exit_codes"], **{k: codes.get(k) for k in run_names})
    return {"module": module.path, "tests": tests, "functions": list(module.functions), "note": module.note,
            "seconds": round(seconds, 1), "returncode": proc.returncode,
            "command": " ".join(["mutmut", "run", "--max-children", str(max_children), *names]),
            "exit_codes": codes}


def summarise(result: dict) -> dict:
    from mutmut.stats import status_by_exit_code

    status = {k: status_by_exit_code[v] for k, v in result["exit_codes"].items()}
    # a mutant no selected test runs ("no tests") is a survivor too: nothing would notice it
    survived = sorted(k for k, s in status.items() if s in ("survived", "no tests"))
    equivalent = [k for k in survived if k in EQUIVALENT]
    killed = sum(s in ("killed", "timeout") for s in status.values())
    timeouts = sum(s == "timeout" for s in status.values())
    other = sorted(k for k, s in status.items() if s not in ("killed", "timeout", "survived", "no tests"))
    not_run = sum(s == "not checked" for s in status.values())  # a run stopped before it reached them
    total = len(status) - not_run
    denominator = total - len(equivalent) - (len(other) - not_run)
    return {"total": total, "not_run": not_run, "killed": killed, "timeouts": timeouts, "survived": len(survived),
            "equivalent": equivalent, "not_equivalent": [k for k in survived if k not in EQUIVALENT],
            "other": {k: status[k] for k in other},
            "score": round(killed / denominator, 4) if denominator else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", default=",".join(MODULES))
    ap.add_argument("--label", default="after")
    ap.add_argument("--source-rev", default="HEAD", help="git revision of the package to mutate (default HEAD)")
    ap.add_argument("--tests-from", default=None, help="git revision whose tests/ to use (default: --source-rev; "
                    "e.g. main before the new tests)")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only regenerate the RESULTS.md section")
    ap.add_argument("--retest-survivors-of", default=None, metavar="LABEL",
                    help="run only the survivors of an earlier run (benchmarks/mutation_LABEL.json) with today's tests")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / f"mutation_{args.label}.json"
    if not args.report:
        data = json.loads(out.read_text()) if out.exists() else {}
        for name in args.modules.split(","):
            rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.source_rev], check=True,
                                 capture_output=True, text=True).stdout.strip()
            retest = None
            if args.retest_survivors_of:
                retest = json.loads((ROOT / "benchmarks" / f"mutation_{args.retest_survivors_of}.json").read_text())[name]
            result = run_module(name, args.label, args.source_rev, args.tests_from, args.max_children, retest)
            if retest is not None:
                result["seconds"] = round(result["seconds"] + retest["seconds"], 1)
                result["command"] += f" (re-test of the survivors of a run of {retest['seconds']:.0f} s)"
            result["source_rev"], result["tests_from"] = rev, args.tests_from or rev
            data[name] = result
            out.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
            s = summarise(result)
            print(f"{name}: {s['killed']}/{s['total']} killed, {s['survived']} survived, score {s['score']}, "
                  f"{result['seconds']} s", flush=True)
    report()


def report() -> None:
    import mutmut

    runs: dict[str, dict] = {}
    for label in ("before", "after"):  # a later file (mutation_after2.json: a re-run of some modules) overrides
        for p in sorted((ROOT / "benchmarks").glob(f"mutation_{label}*.json")):
            runs.setdefault(label, {}).update(json.loads(p.read_text()))
    after, before = runs.get("after", {}), runs.get("before", {})
    version = getattr(mutmut, "__version__", "3.8.1")
    lines = [SECTION, "",
             f"Tool: mutmut {version}, run per module by `python benchmarks/mutation.py --label after` (and "
             "`--label before --tests-from <main before the new tests>`): each module in its own scratch copy under "
             "build/mutation/, `[tool.mutmut]` generated with `only_mutate` = the module and "
             "`pytest_add_cli_args_test_selection` = the tests below, then `mutmut run --max-children 2 [function "
             "globs]` (the command per module is in benchmarks/mutation_after*.json). Score = killed (timeouts count as "
             "killed) / (total − equivalent). 2 CPU cores, shared.", "",
             "| module | scope | tests | total | killed | survived | equivalent | timeouts | score before | "
             "score after | time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in MODULES:
        if name not in after:
            continue
        a = summarise(after[name])
        b = summarise(before[name]) if name in before else None
        scope = ", ".join(f"`{f}`" for f in after[name]["functions"]) or "whole module"
        if a["not_run"]:
            scope += f" (run stopped: {a['not_run']} mutants not run)"
        files = {}
        for t in after[name]["tests"]:
            path, _, func = t.replace("tests/", "").partition("::")
            files.setdefault(path, []).append(func)
        tests = ", ".join(f if "" in fs else f"{f} ({len(fs)} test{'s' if len(fs) > 1 else ''})"
                          for f, fs in files.items())
        pct = (lambda s: "–" if s is None or s["score"] is None else f"{100 * s['score']:.1f} %")
        lines.append(f"| {after[name]['module']} | {scope} | {tests} | {a['total']} | {a['killed']} | "
                     f"{a['survived']} | {len(a['equivalent'])} | {a['timeouts']} | {pct(b)} | {pct(a)} | "
                     f"{after[name]['seconds']:.0f} s |")
    total_s = sum(after[n]["seconds"] for n in after) + sum(before[n]["seconds"] for n in before)
    lines += ["", f"Time: {total_s / 60:.0f} min for both runs of every module (after: "
              f"{sum(after[n]['seconds'] for n in after) / 60:.0f} min; before: "
              f"{sum(before[n]['seconds'] for n in before) / 60:.0f} min; --max-children 1 or 2 as each run's "
              "command in its JSON file says, concurrently with other jobs). The test selections of each module are "
              "listed in benchmarks/mutation.py (MODULES); 'before' uses the same selection at the old revision, "
              "without the test files and functions it lacks.",
              "", "The bugs planted by hand for the issue (each survived the suite at main; each fails these tests "
              "now, checked by planting it; the last row is a defect of the library itself, kept visible by a "
              "strict xfail):", "", "| bug | killed by |", "|---|---|"]
    lines += [f"| {bug} | {tests} |" for bug, tests in HAND_MUTANTS]
    lines += ["", "Equivalent survivors (no observable change):", ""]
    for name in MODULES:
        for k in summarise(after[name])["equivalent"] if name in after else []:
            lines.append(f"- `{k}`: {EQUIVALENT[k]}")
    lines += ["", "Non-equivalent survivors left:", ""]
    for name in MODULES:
        for k in summarise(after[name])["not_equivalent"] if name in after else []:
            lines.append(f"- `{k}`")
    text = "\n".join(lines) + "\n"
    results = ROOT / "benchmarks" / "RESULTS.md"
    old = results.read_text()
    start = old.find(SECTION)
    if start >= 0:
        end = old.find("\n## ", start + len(SECTION))
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    results.write_text(old.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
