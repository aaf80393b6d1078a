"""Bounded collectives (simu_fast/distributed/collectives.py): buckets cut many tensors into runs of at most
`limit` elements per dtype and device; params_in_sync and average_gradients work bucket by bucket."""
import torch

from simu_fast.distributed import collectives


def test_buckets_group_by_dtype_and_cut_at_the_limit():
    a, b, c = torch.zeros(4), torch.zeros(5), torch.zeros(3)
    h = torch.zeros(6, dtype=torch.float16)
    big = torch.zeros(20)
    runs = collectives.buckets([a, h, b, c, big], limit=10)
    ids = [[id(t) for t in run] for run in runs]
    assert ids == [[id(a), id(b)], [id(c)], [id(big)], [id(h)]]  # closed runs first, then the open ones
    assert collectives.buckets([]) == []


def test_average_gradients_in_buckets_equals_one_buffer(monkeypatch):
    """In one gloo process the mean is the gradient itself: every bucket is reduced and written back in place."""
    import tempfile
    import torch.distributed as dist
    store = tempfile.NamedTemporaryFile(delete=False)
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        expected = [p.grad.clone() for p in model.parameters()]
        monkeypatch.setattr(collectives, "BUCKET_ELEMENTS", 16)
        seen = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (seen.append(t.numel()), real(t, **kw))[1])
        collectives.average_gradients(model)
        assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))
        assert len(seen) > 1 and sum(seen) == sum(p.numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()
