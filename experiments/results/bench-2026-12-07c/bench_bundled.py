import time
from cwsim import native
from cwsim.config import SimConfig
from cwsim.runner import DEFAULT_TRACE, simulate, resolve_kv_blocks
from cwsim.steptime import load_profile
from traces import load_trace
tr = load_trace(DEFAULT_TRACE)
cfg0 = SimConfig(policy="vllm", block_size=16)
kv = resolve_kv_blocks(cfg0, load_profile(cfg0.profile))
cfg = SimConfig(policy="vllm", kv_blocks=kv, block_size=16, arrivals="concurrent", agents=16)
simulate(tr, cfg)
bw = bc = 1e9
for i in range(5):
    t, c = time.perf_counter(), time.process_time(); r = simulate(tr, cfg)
    bw, bc = min(bw, time.perf_counter() - t), min(bc, time.process_time() - c)
n = r.summary["requests"]
print(f"bundled: {n} calls, best wall {bw:.3f} s = {n/bw:,.0f} calls/s, best cpu {bc:.3f} s = {n/bc:,.0f} calls/s; {native.describe()}")
