"""One layer's decode attention in isolation: DynamicCache (append + SDPA) against int4 (append +
fused kernel + merge), with the kernel alone, at 1k and 8k tokens (3 KV heads x 64, 9 query heads).

    .venv/bin/python scripts/attend_layer.py
"""
import torch, time
torch.set_num_threads(2)
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from kvshrink.cache import CompressedCache
from kvshrink.codecs.quant import IntQuant
class M: 
    num_key_value_groups=3; is_causal=True; training=False
for n in (1000, 8100):
    dc = DynamicCache()
    dc.update(torch.randn(1,3,n,64), torch.randn(1,3,n,64), 0)
    q = torch.randn(1,9,1,64)
    def dstep():
        k,v = dc.update(torch.randn(1,3,1,64), torch.randn(1,3,1,64), 0)
        return sdpa_attention_forward(M(), q, k, v, None, scaling=0.125)
    for _ in range(3): dstep()
    t=time.perf_counter(); N=40
    for _ in range(N): dstep()
    td=(time.perf_counter()-t)/N*1000
    kc=IntQuant(4,"channel",128,seed=1); vc=IntQuant(4,"token",None,seed=2)
    cache = CompressedCache(num_layers=1, key_codec=kc, value_codec=vc, sink=4, window=0, block=128, attend="fused", background=True)
    L = cache.layers[0]
    L.update(torch.randn(1,3,n,64), torch.randn(1,3,n,64))
    def istep():
        st,_ = L.update(torch.randn(1,3,1,64), torch.randn(1,3,1,64))
        return st.attend(None, q, None)
    for _ in range(3): istep()
    t=time.perf_counter()
    for _ in range(N): istep()
    ti=(time.perf_counter()-t)/N*1000
    st,_ = L.update(torch.randn(1,3,1,64), torch.randn(1,3,1,64))
    vis=torch.ones(1, st.body.num_tokens, dtype=torch.bool); qq=torch.randn(1,3,3,64)
    t=time.perf_counter()
    for _ in range(N): st.body.partials(qq, vis, 4)
    tk=(time.perf_counter()-t)/N*1000
    print(f"{n} tokens: DynamicCache update+SDPA {td:.2f} ms/layer; int4 update+attend {ti:.2f} ms/layer, of which kernel {tk:.2f}")
