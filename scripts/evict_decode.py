"""Decode tokens/s at a long context: DynamicCache against eviction methods filled from one prefill.
Usage: python scripts/evict_decode.py 8176 kvc-8x snapkv-8x kvc-8x+int4"""
import sys
import time

import torch

torch.set_grad_enabled(False)
from transformers import DynamicCache

from kvshrink import from_method, prepare
from kvshrink.corpus import load_corpus_ids
from kvshrink.eval.needle import fill, prefill_states
from kvshrink.models import load_model

model, tok = load_model(None)
L = int(sys.argv[1])
ids = load_corpus_ids(tok, None, L+100)[None]
prepare(model, "kvc-8x", tok)
t=time.time(); st = prefill_states(model, ids[:, :L]); print("prefill dyn", time.time()-t)
def dec(c, n=16):
    x = ids[:, L:L+1]; lat=[]
    for i in range(n):
        t=time.perf_counter(); lg = model(x, past_key_values=c, use_cache=True).logits[0,-1]; lat.append(time.perf_counter()-t); x = lg.argmax().view(1,1)
    return n/sum(lat)
c = DynamicCache(); 
for i,(k,v) in enumerate(st): c.update(k.clone(), v.clone(), i)
print("dyn decode", dec(c))
for name in sys.argv[2:]:
    c = from_method(name, model); t=time.time(); fill(c, st); f=time.time()-t
    print(name, "fill", f, "decode", dec(c), "ratio", c.compression_ratio())
