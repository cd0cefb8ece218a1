"""Memory: the torch backend never holds the [N, V] logits.

At N=2048, H=256, V=32768 (fp32) one logits matrix is 256 MiB. In a fresh process with
inputs and gradient buffers preallocated, a forward + backward of fused_linear_logprobs
must raise the peak RSS by well under a quarter of that (64 MiB), the weight gradient
itself aside; we require under an eighth (32 MiB) on top of the one [V, H] float32 d_weight
(32 MiB) that autograd hands back before adding it into weight.grad.
The peak of each phase is measured from the RSS at its start: writing "5" to
/proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the current RSS, so an
earlier, higher peak (imports, warm-up) cannot hide a phase's growth. Large allocations go
straight to mmap (glibc knobs), so freed memory leaves RSS at once. The naive full-logits
computation in the same process must raise the peak by at least one logits matrix, which
shows that the measurement sees logits.
"""
import json
import os
import subprocess
import sys

import pytest

MIB = 1 << 20
N, H, V = 2048, 256, 32768

_SCRIPT = r"""
import json, sys
import torch
from drdo_kernels import fused_linear_logprobs

N, H, V = {n}, {h}, {v}
torch.set_num_threads(2)
def status_mib(field):
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024.0  # kB

def start_phase():  # reset the high-water mark to the current RSS; return that RSS (MiB)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")

def phase_growth(start):
    return status_mib("VmHWM") - start

gen = torch.Generator().manual_seed(0)
hidden = torch.randn(N, H, generator=gen).requires_grad_()
weight = (torch.randn(V, H, generator=gen) * 0.05).requires_grad_()
labels = torch.randint(0, V, (N,), generator=gen)
labels[: N // 4] = -100
hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
upstream = torch.randn(N, generator=gen)
# warm-up on a small slice: loads everything (nothing [N, V] sized is kept)
(fused_linear_logprobs(weight, hidden[:64], labels[:64], backend="torch") * upstream[:64]).sum().backward()
start = start_phase()
(fused_linear_logprobs(weight, hidden, labels, backend="torch") * upstream).sum().backward()
fused = phase_growth(start)
start = start_phase()
logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
(logp * (labels != -100) * upstream).sum().backward()
naive = phase_growth(start)
print(json.dumps({{"fused_mib": fused, "naive_mib": naive}}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_torch_backend_peak_rss_is_bounded():
    # large blocks straight from mmap: freed memory leaves RSS at once, so the peak is the live maximum
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(n=N, h=H, v=V)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_mib = N * V * 4 / MIB  # 256
    weight_grad_mib = V * H * 4 / MIB  # 32
    print(result)
    assert result["naive_mib"] > logits_mib, result
    assert result["fused_mib"] - weight_grad_mib < logits_mib / 8, result
