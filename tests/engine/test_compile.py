"""train.compile: the backbone, FPN and head compiled in place, the loss eager.

Inductor compiles a ResNet's forward and backward in minutes on a 2-core CPU, too slow for
this suite: the whole network goes through TorchDynamo and AOTAutograd with the `aot_eager`
backend (the same graph capture, no code generation), and inductor itself compiles the head."""

import torch
from torch._dynamo.utils import counters

from retinanet.engine.step import compile_network, train_step

from .test_host_syncs import make_batch, step_parts


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_training_equals_eager_and_does_not_recompile():
    torch._dynamo.reset()
    counters.clear()
    overrides = ["loss.gamma_schedule=cosine", "loss.gamma=3.0"]
    eager, compiled = step_parts(overrides), step_parts(overrides)
    compiled.model.load_state_dict(eager.model.state_dict())
    compile_network(compiled.model, backend="aot_eager")
    batch = make_batch()

    graphs = None
    for progress in (0.0, 0.3, 0.6, 0.9):
        expected = train_step(eager, batch, progress).losses
        got = train_step(compiled, batch, progress).losses
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-4, atol=1e-5)
        if graphs is None:
            graphs = _graphs()
            assert graphs > 0  # it did compile
    assert _graphs() == graphs  # no recompilation as gamma and the progress change
    for (name, p), q in zip(
        eager.model.named_parameters(), compiled.model.parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    # Checkpoints keep the parameter names of the eager model.
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()


def test_inductor_compiles_the_head():
    torch._dynamo.reset()
    parts = step_parts(["model.fpn.channels=16"])
    head = parts.model.head
    features = [torch.randn(2, 16, s, s) for s in (8, 4, 2, 1, 1)]
    expected = head(features)
    head.compile()  # inductor, as train.compile=true does
    # Compiled fresh: inductor's on-disk cache does not key on ATEN_CPU_CAPABILITY, so a kernel
    # cached by a run with another CPU capability (the AVX2 emulation) would be reused wrongly.
    with torch._inductor.config.patch(force_disable_caches=True):
        got = head(features)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    got[0].sum().backward()
    assert head.cls_score.weight.grad is not None
