"""The C expand kernel (server/engine/expand_kernel.py) against a float64 sum computed here from
the raw tensors: every column path (256- and 64-column blocks, 16-column steps, the scalar tail),
odd row starts and ranks (pairs shared by two slots), weighted mixes, a slot named twice, base
tokens, a slot missing from one member, and y/u as column slices of one GEMM output."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine import expand_kernel

pytestmark = pytest.mark.skipif(not expand_kernel.available(), reason=f"the expand kernel does not build here: {expand_kernel.why_not()}")

BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one rounding is within 2^-8 relative, two within 2^-7


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def _reference(y0, u, members, items):
    """bf16(y + sum bf16(w * u[t, u_col + j]) * B[j]) in float64, the kernel's contract."""
    y = y0.to(torch.float64).clone()
    for t, item in enumerate(items):
        pairs = [(item, 1.0)] if isinstance(item, int) else item
        merged: dict[int, float] = {}
        for slot, weight in pairs:
            if slot:
                merged[slot] = merged.get(slot, 0.0) + weight
        for y_col, u_col, b, rows in members:
            for slot, weight in merged.items():
                if slot not in rows:
                    continue
                first, count = rows[slot]
                coef = _bf16(weight * u[t, u_col + first : u_col + first + count].double())  # [count]
                y[t, y_col : y_col + b.shape[1]] += coef @ b[first : first + count].double()
    return y


def _case(n, outs, layouts, seed=0):
    """One GEMM-like output buffer [n, sum(outs) + R] holding y then u, and the members."""
    g = torch.Generator().manual_seed(seed)
    rows_total = [max((f + c for f, c in rows.values()), default=0) for rows in layouts]
    width, r = sum(outs), sum(rows_total)
    full = (torch.randn(n, width + r, generator=g) * 2).to(torch.bfloat16)
    members, y_col, u_col = [], 0, width
    for out, rows, total in zip(outs, layouts, rows_total):
        b = (torch.randn(total, out, generator=g) * 0.5).to(torch.bfloat16)
        members.append((y_col, u_col - width, b, rows))
        y_col += out
        u_col += total
    return full, width, members


# member layouts: slot -> (first row, rank); odd starts and ranks share a pair between two slots
LAYOUT_A = {1: (0, 8), 2: (8, 3), 3: (11, 16), 5: (27, 1)}
LAYOUT_B = {1: (0, 8), 3: (8, 16), 5: (24, 1)}  # slot 2 does not target this member


@pytest.mark.parametrize("outs", [(256 + 64 + 16 + 5, 24), (576, 192), (1, 37)], ids=["every-column-path", "q-k-like", "narrow"])
@pytest.mark.parametrize("n", [1, 7, 19, 64, 300])  # 19: groups of 2 and 3 tokens sharing segments; 64: groups of 4; 300: past PARALLEL_TOKENS
def test_the_kernel_equals_the_float64_sum(outs, n):
    full, width, members = _case(n, outs, [LAYOUT_A, LAYOUT_B], seed=n)
    items = [[1, 2, 3, 0, 5, ((1, 0.7), (3, 0.3)), ((2, -0.5), (2, 1.25), (5, 2.0)), ((3, 1.0), (0, 4.0))][i % 8] for i in range(n)]
    y, u = full[:, :width], full[:, width:]
    y0 = y.clone()
    expect = _reference(y0, u, members, items)
    plan = expand_kernel.ExpandPlan(members)
    merged_rows = []  # TokenSegments takes merged (slot, weight) pairs, as LoraBatchContext.segments builds them
    for it in items:
        merged: dict[int, float] = {}
        for slot, weight in ([(it, 1.0)] if isinstance(it, int) else it):
            if slot:
                merged[slot] = merged.get(slot, 0.0) + weight
        merged_rows.append(list(merged.items()))
    segments = expand_kernel.TokenSegments(merged_rows)
    u_before = u.clone()
    plan.run(y, u, segments)
    torch.testing.assert_close(y.double(), _bf16(expect), rtol=BF16_ULP, atol=1e-6)
    assert torch.equal(u, u_before)  # u (the same buffer's other columns) is read, never written
    lora = (expect - y0.double()).abs().max()
    assert n == 1 or float(lora) > 1.0  # not vacuous: the LoRA part is large against the tolerance


def test_groups_shared_over_threads_give_the_one_thread_result_bit_for_bit():
    """A prefill-sized step runs its token groups on torch's OpenMP team (2 threads forced here,
    whatever the machine); each token's sum is the same arithmetic either way."""
    n = 2 * expand_kernel.PARALLEL_TOKENS + 3
    full, width, members = _case(n, (576, 192), [LAYOUT_A, LAYOUT_B], seed=3)
    rows = [[[(1, 1.0)], [(3, 1.0)], [(2, 0.5), (5, 2.0)], [], [(5, 1.0)]][i % 5] for i in range(n)]
    plan, segments = expand_kernel.ExpandPlan(members), expand_kernel.TokenSegments(rows)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for parallel in (True, False):
            torch.set_num_threads(2)
            expand_kernel.EXPAND_KERNEL["parallel"] = parallel
            y = full[:, :width].clone()
            plan.run(y, full[:, width:], segments)
            outputs.append(y)
    finally:
        torch.set_num_threads(threads)
        expand_kernel.EXPAND_KERNEL["parallel"] = True
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], full[:, :width])


def test_a_token_without_segments_is_left_bit_for_bit():
    full, width, members = _case(5, (300, 40), [LAYOUT_A, LAYOUT_B])
    y, u = full[:, :width], full[:, width:]
    before = y.clone()
    expand_kernel.ExpandPlan(members).run(y, u, expand_kernel.TokenSegments([[], [(1, 1.0)], [], [(4, 1.0)], [(5, 0.0)]]))
    for t in (0, 2, 3, 4):  # no segment; slot 4 has no rows in either member; weight 0 is dropped
        assert torch.equal(y[t], before[t]), t
    assert not torch.equal(y[1], before[1])


def test_a_plan_refuses_a_y_it_does_not_fit():
    full, width, members = _case(4, (64, 32), [LAYOUT_A, LAYOUT_B])
    plan = expand_kernel.ExpandPlan(members)
    segments = expand_kernel.TokenSegments([[(1, 1.0)]] * 4)
    with pytest.raises(ValueError, match="do not fit"):
        plan.run(full[:, :50], full[:, width:], segments)  # y narrower than the members' columns
    with pytest.raises(ValueError, match="do not fit"):
        plan.run(full[:, :width].float(), full[:, width:], segments)  # not bf16
    with pytest.raises(ValueError, match="do not fit"):
        plan.run(full[:3, :width], full[:3, width:], segments)  # 3 rows for 4 tokens


def test_interleave_pairs_puts_rows_2p_and_2p_plus_1_side_by_side():
    b = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)
    got = expand_kernel.interleave_pairs(b)
    assert got.shape == (2, 8)
    assert got[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert got[1].tolist() == [8, 0, 9, 0, 10, 0, 11, 0]  # odd row count: a zero row appended


@pytest.mark.parametrize("module", ["expand_kernel", "attention_kernel"])
@pytest.mark.parametrize("planted", ["writable-by-others", "symlink"])
def test_an_untrusted_kernel_folder_is_refused_and_the_torch_path_stays(planted, module, tmp_path, monkeypatch):
    """A library found in the kernel folder is loaded into the server: a folder others can write
    (a planted library) or a symlink (re-pointable between the check and the load) is refused,
    with the reason, and ``available()`` is False (for each of the engine's kernels)."""
    import importlib

    from loraplex.server import native

    kernel = importlib.import_module(f"loraplex.server.engine.{module}")
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    folder = real
    if planted == "symlink":
        folder = tmp_path / "kernels"
        folder.symlink_to(real)
    else:
        real.chmod(0o777)
    monkeypatch.setenv("LORAPLEX_KERNEL_DIR", str(folder))
    old = kernel.LIBRARY
    fresh = native.Library(old.name, old.source, old.cflags, old.cpu_flags, old._check, fallback="(test)")  # as the module's, not yet loaded
    assert not fresh.available()
    assert ("symlink" if planted == "symlink" else "writable by others") in fresh.why_not
    assert list(real.iterdir()) == []  # nothing was built or loaded there


def test_the_library_builds_into_the_named_folder(tmp_path, monkeypatch):
    """`python -m loraplex.server.engine.expand_kernel` (the CPU image's build step) compiles into
    LORAPLEX_KERNEL_DIR, and a fresh load there uses that file."""
    import subprocess
    import sys

    folder = tmp_path / "kernels"
    env = {**__import__("os").environ, "LORAPLEX_KERNEL_DIR": str(folder)}
    done = subprocess.run([sys.executable, "-m", "loraplex.server.engine.expand_kernel"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip().splitlines()[-1]
    assert path.startswith(str(folder)) and path.endswith(".so") and (folder / path.rsplit("/", 1)[1]).is_file()
    monkeypatch.setenv("LORAPLEX_KERNEL_DIR", str(folder))
    from loraplex.server import native

    assert native.library_path("lora_expand", expand_kernel._SOURCE, expand_kernel._FLAGS) == path


def test_a_plan_refuses_a_slot_spanning_more_row_pairs_than_one_gather():
    """A slot's rows must fit one gather (MAX_PAIRS row pairs): refused when the plan is built
    (the fold then keeps the GEMM expand), never skipped at run time. 512 rows from an even row
    are 256 pairs; from an odd row they touch 257."""
    b = torch.zeros(1024, 16, dtype=torch.bfloat16)
    expand_kernel.ExpandPlan([(0, 0, b, {1: (0, 512)})])
    expand_kernel.ExpandPlan([(0, 0, b, {1: (1, 510)})])
    with pytest.raises(ValueError, match="257 row pairs"):
        expand_kernel.ExpandPlan([(0, 0, b, {1: (1, 512)})])


def test_a_segment_the_kernel_cannot_gather_raises_instead_of_being_skipped(monkeypatch):
    """The C side's own guard, reached by lifting the plan's check: it reports, Python raises."""
    monkeypatch.setattr(expand_kernel, "MAX_PAIRS", 10_000)
    full, width, members = _case(2, (32,), [{1: (0, 600)}])
    plan = expand_kernel.ExpandPlan(members)
    with pytest.raises(RuntimeError, match="left out 1 segments"):
        plan.run(full[:, :width], full[:, width:], expand_kernel.TokenSegments([[(1, 1.0)], []]))


def test_a_mix_past_one_gather_is_summed_over_several_and_slots_past_the_table_add_nothing():
    """Three rank-200 slots in one mix (300 row pairs: two gathers), same slots with different
    weights in one step (never grouped together), and a slot number past every table."""
    layout = {1: (0, 200), 2: (200, 200), 3: (400, 200)}
    full, width, members = _case(12, (300, 40), [layout, layout], seed=5)
    items = [((1, 0.7), (2, 0.2), (3, 0.1)), ((1, 0.1), (2, 0.2), (3, 0.7)), 2, 9] * 3
    y, u = full[:, :width], full[:, width:]
    y0 = y.clone()
    rows = [[(it, 1.0)] if isinstance(it, int) else list(it) for it in items]
    expand_kernel.ExpandPlan(members).run(y, u, expand_kernel.TokenSegments(rows))
    expect = _reference(y0, u, members, [it if not isinstance(it, int) or it != 9 else 0 for it in items])
    # the two gathers of a token each round onto y: one more bf16 rounding, at the partial sum's scale
    torch.testing.assert_close(y.double(), _bf16(expect), rtol=BF16_ULP, atol=BF16_ULP * float(expect.abs().max()))
    assert torch.equal(y[3::4], y0[3::4])  # slot 9: no rows anywhere
    assert not torch.allclose(y[0].double(), y[1].double())  # different weights, different sums


def test_a_second_openmp_runtime_is_named(monkeypatch, tmp_path):
    """The kernels share torch's libgomp team; a library built by a compiler whose -fopenmp links
    LLVM's libomp (or Intel's libiomp5) would start a second runtime, and is refused by name.
    The process map is a file written here (this process has only libgomp)."""
    import builtins

    from loraplex.server import native

    assert native._foreign_openmp() is None  # this very process: torch's libgomp only
    real_open = builtins.open
    for mapped, expected in (("/usr/lib/llvm-17/lib/libomp.so.5", "libomp.so.5"), ("/opt/x/libiomp5.so", "libiomp5.so"), ("/venv/torch/lib/libgomp.so.1", None)):
        maps = tmp_path / "maps"
        maps.write_text(f"7f00-7f01 r-xp 00000000 08:01 42 {mapped}\n7f02-7f03 rw-p 00000000 00:00 0\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, _m=str(maps), **k: real_open(_m if path == "/proc/self/maps" else path, *a, **k))
        assert native._foreign_openmp() == expected
        monkeypatch.setattr(builtins, "open", real_open)
