"""Teacher features are captured per thread: the caching flow runs shards in threads sharing one teacher,
and a shared capture dict let a thread read another thread's features (the clean-clone demo failed with
`IndexError: index 20 is out of bounds for dimension 0 with size 20` in cache_batch)."""
from __future__ import annotations

import threading

import torch

from snapgen_model.distill.teacher import SD3Teacher


def _teacher() -> SD3Teacher:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=4)
    return SD3Teacher(model)


def _inputs(batch: int):
    return torch.randn(batch, 4, 8, 8), torch.rand(batch), torch.randn(batch, 3, 16), torch.randn(batch, 16)


def test_a_thread_gets_its_own_features_while_another_thread_runs_the_same_teacher():
    teacher = _teacher()
    other_done, results = threading.Event(), {}

    def pause_after_capture(module, args, output):  # thread A waits here, after its features were captured
        if threading.current_thread().name == "A":
            assert other_done.wait(30)

    teacher.transformer.norm_out.register_forward_hook(pause_after_capture)

    def run(name: str, batch: int) -> None:
        results[name] = teacher(*_inputs(batch))
        if name == "B":
            other_done.set()

    a = threading.Thread(target=run, args=("A", 5), name="A")
    a.start()
    b = threading.Thread(target=run, args=("B", 3), name="B")
    b.start()
    b.join(30)
    a.join(30)
    assert results["A"].features["block1"].shape[0] == 5  # not B's batch of 3
    assert results["B"].features["block1"].shape[0] == 3
    # a direct call of the wrapped transformer captures nothing and does not fail
    x, t, c, p = _inputs(2)
    teacher.transformer(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000)
