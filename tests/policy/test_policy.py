"""The policy layer: GNN layers, the features extractor, masking, configs (fast, no compiling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_rl.decisions import ACTION_FUSE, ACTION_KEEP, graph_observation
from fusion_rl.env.spaces import action_space, observation_space
from fusion_rl.errors import ConfigError
from fusion_rl.policy.encoder import GraphEncoder, GraphFeaturesExtractor, obs_to_batch
from fusion_rl.policy.layers import MLP, GATv2Block, add_reverse_edges
from fusion_rl.policy.network import DecisionFeatures, node_chunks
from fusion_rl.policy.policy import PPOConfig

from _tiny import diamond

HW_DIM = 10
HW = np.linspace(0.1, 1.0, HW_DIM, dtype=np.float32)
SMALL = dict(hidden=16, heads=2, num_layers=2, hw_hidden=8)


def as_batch(*observations: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Stack observations the way SB3 hands them to the extractor (Box -> float32)."""
    return {k: torch.as_tensor(np.stack([o[k] for o in observations])).float() for k in observations[0]}


def extractor(max_nodes: int = 64, max_edges: int = 64, **kwargs) -> GraphFeaturesExtractor:
    torch.manual_seed(0)
    return GraphFeaturesExtractor(observation_space(HW_DIM, max_nodes, max_edges), **{**SMALL, **kwargs}).eval()


# ---- layers on a 4-node hand-made graph ------------------------------------------------------


def test_gatv2_block_on_diamond():
    g = diamond()
    x = torch.randn(4, 8)
    edge_index = torch.tensor([[e.src for e in g.edges], [e.dst for e in g.edges]])
    edge_attr = torch.randn(4, 3)
    block = GATv2Block(8, edge_dim=3, heads=4)
    out = block(x, edge_index, edge_attr)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    assert repr(block) == "GATv2Block(8, edge_dim=3, heads=4)"
    before = [p.detach().clone() for p in block.parameters()]
    torch.manual_seed(123)
    block.reset_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, block.parameters()))


def test_reverse_edges_flag_direction():
    edge_index = torch.tensor([[0, 0], [1, 2]])
    ei, ea = add_reverse_edges(edge_index, torch.ones(2, 2))
    assert ei.tolist() == [[0, 0, 1, 2], [1, 2, 0, 0]]
    assert ea[:, -1].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_mlp_repr_and_shapes():
    mlp = MLP((5, 7, 3), activate_last=False)
    assert repr(mlp) == "MLP(5 -> 7 -> 3)"
    assert mlp(torch.randn(2, 5)).shape == (2, 3)


def test_messages_follow_direction_setting():
    """Node 0 is a source: only reversed edges can tell it about node 3."""
    g = diamond()
    x = torch.randn(4, 6)
    edge_index = torch.tensor([[e.src for e in g.edges], [e.dst for e in g.edges]])
    edge_attr = torch.zeros(4, 2)
    x2 = x.clone()
    x2[3] += 1.0
    for bidirectional, changes in ((False, False), (True, True)):
        torch.manual_seed(0)
        enc = GraphEncoder(6, 2, hidden=8, heads=2, num_layers=2, bidirectional=bidirectional)
        h0, h1 = enc(x, edge_index, edge_attr)[0], enc(x2, edge_index, edge_attr)[0]
        assert (not torch.allclose(h0, h1)) == changes


def test_extractor_on_diamond_and_permutation_equivariance():
    """Relabelling the nodes of the 4-node graph leaves the decision features unchanged."""
    g = diamond()
    ext = extractor(8, 8)
    obs = graph_observation(g, HW, 8, 8, decision_edge=2, groups=[0, 0, 2, 3])  # {0,1} fused
    feats = ext(as_batch(obs))
    assert feats.shape == (1, ext.features_dim) == (1, 5 * 16 + 8)

    perm = np.array([3, 2, 1, 0])  # new id of old node i is perm[i]
    p = dict(obs)
    p["node_features"] = obs["node_features"].copy()
    p["node_features"][perm[:4]] = obs["node_features"][:4]
    p["edge_index"] = obs["edge_index"].copy()
    p["edge_index"][:, :4] = perm[obs["edge_index"][:, :4]]
    old_groups = np.array([0, 0, 2, 3])
    new_groups = np.zeros(8, np.int64)
    for old in range(4):  # group label = smallest new id among the group's members
        members = perm[np.flatnonzero(old_groups == old_groups[old])]
        new_groups[perm[old]] = members.min()
    p["group"] = new_groups
    p["decision"] = np.array([2, perm[obs["decision"][1]], perm[obs["decision"][2]]])
    torch.testing.assert_close(ext(as_batch(p)), feats, atol=1e-5, rtol=1e-5)


# ---- the extractor on real zoo graphs --------------------------------------------------------


@pytest.fixture(scope="module")
def graphs(model_cache):
    return model_cache("mlp_tiny").graph, model_cache("cnn_plain").graph


def test_extractor_batches_graphs_of_different_sizes(graphs):
    mlp, cnn = graphs
    assert len(mlp) != len(cnn)
    ext = extractor()
    a = graph_observation(mlp, HW, 64, 64, decision_edge=1)
    b = graph_observation(cnn, HW, 64, 64, decision_edge=len(cnn.edges) - 1)
    space = observation_space(HW_DIM, 64, 64)
    assert space.contains(a) and space.contains(b)

    batch = obs_to_batch(as_batch(a, b))
    assert batch.x.shape[0] == len(mlp) + len(cnn)
    assert batch.edge_index.shape[1] == len(mlp.edges) + len(cnn.edges)

    feats = ext(as_batch(a, b))
    assert feats.shape == (2, ext.features_dim) and torch.isfinite(feats).all()
    # Graphs in one batch do not see each other.
    torch.testing.assert_close(feats[0:1], ext(as_batch(a)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[1:2], ext(as_batch(b)), atol=1e-5, rtol=1e-5)


def test_node_chunks_respect_the_budget_and_keep_large_graphs_whole():
    mask = torch.zeros(5, 8)
    for row, count in enumerate([3, 2, 6, 1, 1]):
        mask[row, :count] = 1.0
    assert node_chunks(mask, 5) == [slice(0, 2), slice(2, 3), slice(3, 5)]
    assert node_chunks(mask, 100) == [slice(0, 5)]
    assert node_chunks(mask, 1) == [slice(i, i + 1) for i in range(5)]
    assert node_chunks(torch.zeros(0, 8), 5) == [slice(0, 0)]


def test_chunked_encoding_gives_the_features_and_gradients_of_one_batch(graphs, monkeypatch):
    mlp, cnn = graphs
    observations = [graph_observation(g, HW, 64, 64, decision_edge=i) for g in (mlp, cnn, cnn, mlp) for i in (0, 1)]
    batch = as_batch(*observations)

    def features_and_grads(chunk_nodes: int):
        monkeypatch.setattr(DecisionFeatures, "CHUNK_NODES", chunk_nodes)
        ext = extractor()
        feats = ext(batch)
        feats.square().sum().backward()
        return feats.detach(), [p.grad.clone() for p in ext.parameters() if p.grad is not None]

    whole, whole_grads = features_and_grads(10_000)
    assert len(node_chunks(batch["node_mask"], len(cnn))) > 2
    chunked, chunked_grads = features_and_grads(len(cnn))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert len(chunked_grads) == len(whole_grads)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_padding_invariance(graphs):
    _, cnn = graphs
    groups = list(range(len(cnn)))
    groups[1] = 0  # one fused pair, so the group pools differ from the node embeddings
    small = graph_observation(cnn, HW, len(cnn), len(cnn.edges), decision_edge=3, groups=groups)
    large = graph_observation(cnn, HW, 200, 300, decision_edge=3, groups=groups)
    torch.manual_seed(0)
    ext_small = GraphFeaturesExtractor(observation_space(HW_DIM, len(cnn), len(cnn.edges)), **SMALL)
    ext_large = GraphFeaturesExtractor(observation_space(HW_DIM, 200, 300), **SMALL)
    ext_large.load_state_dict(ext_small.state_dict())  # same weights: the network has no size in it
    torch.testing.assert_close(ext_small(as_batch(small)), ext_large(as_batch(large)), atol=1e-5, rtol=1e-5)


def test_all_padding_observation_gives_zeros_not_errors():
    ext = extractor(8, 8)
    obs = {k: np.zeros(s.shape, s.dtype) for k, s in observation_space(HW_DIM, 8, 8).spaces.items()}
    feats = ext(as_batch(obs))
    assert feats.shape == (1, ext.features_dim)
    assert torch.count_nonzero(feats[0, : 5 * SMALL["hidden"]]) == 0


def test_hardware_vector_conditions_features(graphs):
    mlp, _ = graphs
    ext = extractor()
    a = graph_observation(mlp, HW, 64, 64)
    b = graph_observation(mlp, HW[::-1].copy(), 64, 64)
    fa, fb = ext(as_batch(a)), ext(as_batch(b))
    graph_part = 5 * SMALL["hidden"]
    torch.testing.assert_close(fa[:, :graph_part], fb[:, :graph_part])
    assert not torch.allclose(fa[:, graph_part:], fb[:, graph_part:])


def test_extractor_rejects_wrong_space():
    from gymnasium import spaces

    with pytest.raises(ValueError, match="missing"):
        GraphFeaturesExtractor(spaces.Dict({"node_features": spaces.Box(0, 1, (4, 3))}))


# ---- masked policy ---------------------------------------------------------------------------


def test_masked_actions_are_never_chosen(graphs):
    from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy

    mlp, _ = graphs
    torch.manual_seed(0)
    policy = MaskableMultiInputActorCriticPolicy(
        observation_space(HW_DIM, 64, 64), action_space(), lambda _: 1e-3,
        features_extractor_class=GraphFeaturesExtractor, features_extractor_kwargs=SMALL,
    )
    obs = [graph_observation(mlp, HW, 64, 64, decision_edge=i) for i in range(len(mlp.edges))]
    batch = as_batch(*obs)
    n = len(obs)
    for allowed in (ACTION_KEEP, ACTION_FUSE):
        masks = np.zeros((n, 2), bool)
        masks[:, allowed] = True
        with torch.no_grad():
            dist = policy.get_distribution(batch, action_masks=masks)
            probs = dist.distribution.probs
            assert torch.all(probs[:, 1 - allowed] == 0)
            for _ in range(20):
                assert (dist.sample() == allowed).all()
        actions, _ = policy.predict({k: v.numpy() for k, v in batch.items()}, action_masks=masks)
        assert (actions == allowed).all()
    # Mixed masks per row.
    masks = np.array([[True, False], [False, True]] * (n // 2) + [[True, True]] * (n % 2))
    with torch.no_grad():
        for _ in range(20):
            actions, _, _ = policy(batch, action_masks=masks)
            assert masks[np.arange(n), actions.numpy()].all()


# ---- configs ---------------------------------------------------------------------------------


def test_ppo_config_defaults_are_xrlflow():
    c = PPOConfig.from_dict({})
    assert (c.gamma, c.gae_lambda, c.learning_rate, c.clip_range) == (0.99, 0.95, 5e-4, 0.2)
    assert PPOConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"learning_rte": 1e-3}, "unknown key"),
        ({"n_steps": "64"}, "expected an integer"),
        ({"n_steps": 1.5}, "expected an integer"),
        ({"gamma": True}, "expected a number"),
        ({"net_arch": 64}, "expected a list"),
        ({"features_extractor": "no.such.Class"}, "not a registered features extractor"),
        ({"features_extractor": "torch.nn.Linear"}, "not a registered features extractor"),
    ],
)
def test_ppo_config_rejects_bad_values(bad, message):
    with pytest.raises(ConfigError, match=message):
        PPOConfig.from_dict(bad)
