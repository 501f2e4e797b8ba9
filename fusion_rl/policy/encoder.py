"""The GNN encoder of the fusion policy, as an SB3 features extractor.

:class:`GraphFeaturesExtractor` turns a batch of padded ``Dict`` observations (the contract of
:mod:`fusion_rl.decisions.layout`) into one fixed-size vector per observation, whatever the graph's
size:

1. :func:`obs_to_batch` strips the padding (``node_mask``, ``edge_mask``) into one PyG
   :class:`~torch_geometric.data.Batch` of disjoint graphs;
2. :class:`GraphEncoder` runs ``num_layers`` rounds of :class:`~fusion_rl.policy.layers.GATv2Block`
   over it (edges in both directions);
3. a readout concatenates ``[h_src, h_dst, mean(src group), mean(dst group), mean(graph),
   MLP(hardware)]``, where src/dst are the two ends of the edge being decided (``decision``) and
   the groups are their current groups (``group``).

Only real nodes and edges reach the GNN, so the features do not depend on ``max_nodes`` /
``max_edges`` (``tests/policy/test_policy.py`` checks this), and one trained network serves graphs of
any size and any target (the hardware vector conditions the readout).
"""

from __future__ import annotations

from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor

from fusion_rl.decisions.layout import OBSERVATION_KEYS
from fusion_rl.policy.network import DecisionFeatures, GraphEncoder, obs_to_batch

__all__ = ["GraphEncoder", "GraphFeaturesExtractor", "obs_to_batch", "REQUIRED_KEYS"]

#: Observation keys the extractor reads (all of :mod:`fusion_rl.decisions.layout`'s).
REQUIRED_KEYS = OBSERVATION_KEYS


class GraphFeaturesExtractor(BaseFeaturesExtractor):
    """SB3 features extractor: padded graph observation -> fixed-size decision features.

    ``features_dim = 5 * hidden + hw_hidden``. Choose it through ``policy_kwargs`` as SB3 does::

        MaskablePPO("MultiInputPolicy", env, policy_kwargs=dict(
            features_extractor_class=GraphFeaturesExtractor,
            features_extractor_kwargs=dict(hidden=32, heads=4, num_layers=5)))

    Parameters
    ----------
    observation_space
        The env's ``Dict`` space (:func:`fusion_rl.env.spaces.observation_space`).
    hidden
        Node embedding width.
    heads
        Attention heads.
    num_layers
        Rounds of message passing.
    hw_hidden
        Width of the hardware embedding.
    bidirectional
        Pass messages against the data flow too.
    dropout
        Dropout on attention coefficients.
    """

    def __init__(
        self, observation_space: spaces.Dict, hidden: int = 32, heads: int = 4, num_layers: int = 5,
        hw_hidden: int = 16, bidirectional: bool = True, dropout: float = 0.0,
    ) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in getattr(observation_space, "spaces", {})]
        if missing:
            raise ValueError(
                f"GraphFeaturesExtractor needs a Dict observation space with keys {REQUIRED_KEYS}; "
                f"missing {missing}. Build it with fusion_rl.env.spaces.observation_space()."
            )
        super().__init__(observation_space, features_dim=5 * hidden + hw_hidden)
        #: Constructor kwargs of the SB3-free core, recorded in exported policy cards.
        self.core_kwargs = dict(
            node_dim=observation_space["node_features"].shape[-1],
            edge_dim=observation_space["edge_features"].shape[-1],
            hw_dim=observation_space["hardware"].shape[-1],
            hidden=hidden, heads=heads, num_layers=num_layers, hw_hidden=hw_hidden,
            bidirectional=bidirectional, dropout=dropout,
        )
        self.core = DecisionFeatures(**self.core_kwargs)

    @property
    def encoder(self) -> GraphEncoder:
        return self.core.encoder

    @property
    def hardware(self):
        return self.core.hardware

    def reset_parameters(self) -> None:
        self.core.reset_parameters()

    def forward(self, observations: dict[str, Tensor]) -> Tensor:
        return self.core(observations)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(features_dim={self.features_dim}, encoder={self.encoder!r}, "
            f"hardware={self.hardware!r})"
        )
