"""World helpers in one process (the multi-rank path is tested end to end in test_distill with two gloo ranks)."""
import pytest
import torch

from clpdd_fast.distributed import World, init_from_env


def test_blocks_partition_the_items():
    for n in [1, 7, 10, 1000]:
        for size in [1, 2, 3, 8]:
            if size > n:
                continue
            blocks = [World(r, size).block(n) for r in range(size)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            lengths = [b - a for a, b in blocks]
            assert max(lengths) - min(lengths) <= 1


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world, device = init_from_env("cpu")
    assert world == World() and not world.active and world.is_main and device.type == "cpu"
    x = torch.randn(5, 3)
    assert world.gather_rows(x, 5) is x
    assert torch.equal(world.sum_(x.clone()), x)


def _single_member_group(tmp_path):
    """A real gloo process group of one member (file store), standing in for what torchrun would set up."""
    import torch.distributed as dist
    init = dist.init_process_group   # the real one, also once a test has patched the module's attribute
    return lambda backend: init(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


def test_shutdown_destroys_the_group_init_created(monkeypatch, tmp_path):
    import torch.distributed as dist
    from clpdd_fast import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")   # take the torchrun path, with a group of one member
    monkeypatch.setattr(dist, "init_process_group", _single_member_group(tmp_path))
    init_from_env("cpu")
    assert dist.is_initialized()
    distributed.shutdown()
    assert not dist.is_initialized()
    distributed.shutdown()   # a second call (e.g. after an error path already shut down) is harmless


def test_shutdown_leaves_a_group_the_caller_made(monkeypatch, tmp_path):
    import torch.distributed as dist
    from clpdd_fast import distributed
    _single_member_group(tmp_path)("gloo")
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        world, _ = init_from_env("cpu")
        assert world.size == 1
        distributed.shutdown()
        assert dist.is_initialized(), "a process group the caller created is the caller's to destroy"
    finally:
        dist.destroy_process_group()


def test_distill_leaves_the_group_on_errors(monkeypatch):
    from clpdd_fast import distill
    calls = []
    monkeypatch.setattr(distill, "shutdown", lambda: calls.append(1))

    def broken_setup(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(distill, "setup", broken_setup)
    with pytest.raises(KeyboardInterrupt):
        distill.main(["--device", "cpu"])
    assert calls == [1]


def _two_rank_case():
    """A small CLP-DD step problem, the same in every process: encoder, synthetic set, real features."""
    from clpdd_fast.augment import build_augment
    from clpdd_fast.encoders import build_encoder
    from clpdd_fast.feature_transform import FeatureTransform
    from clpdd_fast.synthetic import build_synthetic
    from helpers import TINY_MODEL
    encoder = build_encoder(TINY_MODEL, "none", "cpu")   # "none": a fixed-seed random init
    g = torch.Generator().manual_seed(5)
    real = torch.randn(41, encoder.feature_dim, generator=g)
    transform = FeatureTransform.fit("center-l2", real)
    labels = torch.tensor([0, 0, 1, 1, 2])
    init = torch.rand(5, 3, 36, 36, generator=g) * 0.8 + 0.1
    synthetic = build_synthetic("pixel", labels, 36, init, grow_every=0)
    return encoder, build_augment("standard"), transform, transform(real), torch.arange(41) % 3, synthetic


def _step_grads(world):
    """The synthetic parameters' gradients after one clpdd_step of `world`'s rank (its shard of the real rows)."""
    from clpdd_fast.methods import ClpddInputs, StepInputs, clpdd_step
    encoder, augment, transform, real, labels, synthetic = _two_rank_case()
    first, stop = world.block(len(labels))
    clpdd = ClpddInputs(real_features=real[first:stop], real_labels=labels[first:stop], transform=transform,
                        lam=0.3, tau=0.2, real_share=(stop - first) / len(labels))
    inputs = StepInputs(encoder=encoder, augment=augment, image_size=32, num_classes=3, encoder_batch=2, clpdd=clpdd,
                        world=world)
    loss = clpdd_step(synthetic, inputs, torch.Generator().manual_seed(11))
    return loss, [p.grad.clone() for p in synthetic.parameters()]


def _rank_main(rank, size, store, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        torch.save(_step_grads(World(rank, size)), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_sum_to_the_single_process_gradient(tmp_path):
    """Each rank holds half the real rows and backpropagates half the images; after the step every rank must hold
    the full gradient of the one-process loss (a mean over ranks instead of a sum would halve it)."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    loss, grads = _step_grads(World())
    assert all(float(g.abs().max()) > 0 for g in grads)
    for rank in range(2):
        rank_loss, rank_grads = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(rank_loss, loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(rank_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _shutdown_rank(rank, size, port, out):
    import importlib
    import os
    os.environ.update(WORLD_SIZE=str(size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from clpdd_fast.distributed import shutdown
    world, _ = init_from_env("cpu")
    world.sum_(torch.ones(3))
    importlib.import_module("torch._dynamo")   # as timm's import does: it reaches torch.distributed.nn.functional
    shutdown()
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(" ".join(t for t in threads if "gloo" in t))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="reads the threads from /proc")
def test_shutdown_stops_the_gloo_threads(tmp_path):
    """shutdown() really frees the process group, whatever was imported after init_from_env: its gloo threads are
    gone, not left to interpreter exit (where torch 2.11 can abort the rank with SIGABRT)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shutdown_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "", f"rank {rank}: gloo threads left after shutdown"
