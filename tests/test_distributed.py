"""World helpers in one process (the multi-rank path is tested end to end in test_distill with two gloo ranks)."""
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
