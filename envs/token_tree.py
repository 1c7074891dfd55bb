"""A toy language model: sequences of ``length`` tokens from a ``vocab``-token vocabulary, one per step.

States are all prefixes of length 0 … T−1 (``n = (V^T − 1)/(V − 1)`` of them), the action is the next token,
and the reward is 0 until the last token, which earns the whole sequence's reward — the RLHF setting in
miniature. The reference ("SFT model") is a fixed softmax per prefix. Because the tree has no merging
paths, the KL-regularized optimum over whole sequences is ``π*(y) = π_ref(y) e^{r(y)/β} / Z``
(:func:`gibbs_sequence_optimum`), which soft value iteration must reproduce token by token.

Indexing: the prefix ``(y_0, …, y_{l−1})`` has state ``(V^l − 1)/(V − 1) + code``, where ``code`` reads the
prefix as a base-V number (first token most significant); whole sequences are numbered by their code in
``[0, V^T)``, so prefix order is breadth-first and lexicographic within a length.

Rewards (``reward``): ``"target"`` pays 1 for the one sequence ``target`` and 0 for every other;
``"table"`` reads ``reward_table`` (``V^T`` values in sequence order); ``"random"`` draws standard normals
from ``reward_seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from envs.gym_shell import TabularEnv
from envs.params import EnvParams, check_beta, check_choice, check_float, check_floats, check_int, set_field
from envs.tabular import TabularMDP

REWARDS = ("target", "table", "random")
MAX_PREFIXES = 4096  # the one-hot features are [n, n] float32 (64 MiB at this size)


def n_prefixes_of(vocab: int, length: int) -> int:
    """Number of prefixes of length 0 … ``length``−1: ``(V^T − 1)/(V − 1)``."""
    return (vocab**length - 1) // (vocab - 1)


def prefix_of_state(state: int, vocab: int) -> tuple[int, ...]:
    """The token prefix of ``state`` (the inverse of :func:`state_of_prefix`)."""
    if state < 0:
        raise ValueError(f"state must be >= 0 (got {state})")
    length, offset = 0, 0
    while state >= offset + vocab**length:
        offset += vocab**length
        length += 1
    code = state - offset
    return tuple((code // vocab ** (length - 1 - i)) % vocab for i in range(length))


def state_of_prefix(prefix: tuple[int, ...] | list[int], vocab: int) -> int:
    """The state index of a token prefix."""
    code = 0
    for y in prefix:
        code = code * vocab + int(y)
    return n_prefixes_of(vocab, len(prefix)) + code


def sequence_tokens(vocab: int, length: int) -> Tensor:
    """``[V^T, T]`` int64: the tokens of every sequence, in sequence-code order."""
    codes = torch.arange(vocab**length)
    powers = vocab ** torch.arange(length - 1, -1, -1)
    return (codes[:, None] // powers) % vocab


def sequence_states(vocab: int, length: int) -> Tensor:
    """``[V^T, T]`` int64: the prefix state at each position of every sequence."""
    codes = torch.arange(vocab**length)
    pos = torch.arange(length)
    offsets = (vocab**pos - 1) // (vocab - 1)
    return offsets + codes[:, None] // vocab ** (length - pos)


@dataclass(frozen=True)
class TokenTreeParams(EnvParams):
    """Config of the token tree (the ``env:`` keys of ``id: token_tree``).

    Attributes:
        vocab: vocabulary size ``V`` (>= 2).
        length: sequence length ``T`` (>= 1).
        reward: ``"target"``, ``"table"`` or ``"random"`` (see the module docstring).
        target: the rewarded sequence for ``"target"`` (default all zeros), ``T`` tokens in ``[0, V)``.
        reward_table: ``V^T`` sequence rewards for ``"table"``, in sequence-code order.
        reward_seed: seed of the ``"random"`` rewards.
        ref_logits_seed: seed of the reference logits (standard normal) when ``ref_logits`` is not given.
        ref_temperature: the reference is ``softmax(logits / ref_temperature)`` (> 0).
        ref_logits: explicit reference logits, ``n_prefixes`` rows of ``V``, in state order.
    """

    vocab: int = 3
    length: int = 3
    reward: str = "target"
    target: tuple[int, ...] | None = None
    reward_table: tuple[float, ...] | None = None
    reward_seed: int = 0
    ref_logits_seed: int = 0
    ref_temperature: float = 1.0
    ref_logits: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        V = check_int("vocab", self.vocab, minimum=2)
        T = check_int("length", self.length, minimum=1)
        set_field(self, "vocab", V)
        set_field(self, "length", T)
        if n_prefixes_of(V, T) > MAX_PREFIXES:
            raise ValueError(f"env.vocab={V} and env.length={T} give {n_prefixes_of(V, T)} prefix states; "
                             f"at most {MAX_PREFIXES} are supported (one-hot features): lower env.vocab "
                             "or env.length")
        check_choice("reward", self.reward, REWARDS)
        if self.target is not None:
            target = tuple(check_int("target", y) for y in check_floats("target", self.target, length=T))
            if min(target) < 0 or max(target) >= V:
                raise ValueError(f"env.target tokens must lie in [0, {V}) (got {list(target)})")
            set_field(self, "target", target)
        if self.reward_table is not None:
            set_field(self, "reward_table", check_floats("reward_table", self.reward_table, length=V**T))
        elif self.reward == "table":
            raise ValueError(f"env.reward_table ({V**T} values) is required for env.reward='table'")
        set_field(self, "reward_seed", check_int("reward_seed", self.reward_seed))
        set_field(self, "ref_logits_seed", check_int("ref_logits_seed", self.ref_logits_seed))
        temperature = check_float("ref_temperature", self.ref_temperature, positive=True)
        set_field(self, "ref_temperature", temperature)
        if self.ref_logits is not None:
            n = self.n_prefixes
            if len(self.ref_logits) != n or any(not isinstance(row, tuple) for row in self.ref_logits):
                raise ValueError(f"env.ref_logits must be {n} rows (one per prefix state) of {V} logits")
            rows = tuple(check_floats("ref_logits", row, length=V) for row in self.ref_logits)
            set_field(self, "ref_logits", rows)

    @property
    def n_prefixes(self) -> int:
        """Number of states ``S = (V^T − 1)/(V − 1)``."""
        return n_prefixes_of(self.vocab, self.length)

    @property
    def n_sequences(self) -> int:
        """Number of whole sequences ``V^T``."""
        return self.vocab**self.length

    def sequence_rewards(self) -> Tensor:
        """``[V^T]`` float64 reward of every sequence, in sequence-code order."""
        if self.reward == "table":
            return torch.tensor(self.reward_table, dtype=torch.float64)
        if self.reward == "random":
            g = torch.Generator().manual_seed(self.reward_seed)
            return torch.randn(self.n_sequences, generator=g, dtype=torch.float64)
        target = self.target if self.target is not None else (0,) * self.length
        rewards = torch.zeros(self.n_sequences, dtype=torch.float64)
        rewards[state_of_prefix(target, self.vocab) - self.n_prefixes] = 1.0
        return rewards

    def ref_logp(self) -> Tensor:
        """``[S, V]`` float64 log-probabilities of the reference at every prefix."""
        if self.ref_logits is not None:
            logits = torch.tensor(self.ref_logits, dtype=torch.float64)
        else:
            g = torch.Generator().manual_seed(self.ref_logits_seed)
            logits = torch.randn(self.n_prefixes, self.vocab, generator=g, dtype=torch.float64)
        return torch.log_softmax(logits / self.ref_temperature, dim=-1)

    def build(self) -> TabularMDP:
        """The tree as a layered :class:`TabularMDP` (``K = 1``; features: one-hot prefix ``[S, S]``)."""
        V, T, S = self.vocab, self.length, self.n_prefixes
        state = torch.arange(S)
        length_of = torch.zeros(S, dtype=torch.long)
        for l in range(1, T):
            length_of[n_prefixes_of(V, l):] = l
        code = state - (V**length_of - 1) // (V - 1)
        child_code = code[:, None] * V + torch.arange(V)  # [S, V]
        last = (length_of == T - 1)[:, None]
        next_state = torch.where(last, S, (V ** (length_of[:, None] + 1) - 1) // (V - 1) + child_code)
        # child codes of the last layer are whole-sequence codes; earlier ones stay below V^(T-1)
        reward = torch.where(last, self.sequence_rewards()[child_code], torch.zeros((), dtype=torch.float64))
        mdp = TabularMDP(
            next_state=next_state[..., None],
            next_prob=torch.ones(S, V, 1, dtype=torch.float64),
            reward=reward[..., None],
            init_prob=torch.nn.functional.one_hot(torch.tensor(0), S).to(torch.float64),
            ref_logp=self.ref_logp(),
            horizon=T,
            features=torch.eye(S, dtype=torch.float32),
            state_time=length_of,
        )
        mdp.validate()
        return mdp


def _vocab_length(mdp: TabularMDP) -> tuple[int, int]:
    V, T = mdp.n_actions, mdp.horizon
    if mdp.n_states != n_prefixes_of(V, T):
        raise ValueError(f"not a token-tree MDP: {mdp.n_states} states for vocab {V} and length {T}")
    return V, T


def sequence_logprobs(mdp: TabularMDP, logp: Tensor) -> Tensor:
    """Exact log-probabilities ``[..., V^T]`` of every whole sequence under policy ``logp [..., S, V]``."""
    V, T = _vocab_length(mdp)
    states = sequence_states(V, T).to(logp.device)
    tokens = sequence_tokens(V, T).to(logp.device)
    return logp[..., states, tokens].sum(-1)


def sequence_probs(mdp: TabularMDP, logp: Tensor) -> Tensor:
    """Exact probabilities ``[..., V^T]`` of every whole sequence under the policy ``logp [..., S, V]``."""
    return sequence_logprobs(mdp, logp).exp()


def gibbs_sequence_optimum(params: TokenTreeParams, beta: float | Tensor) -> Tensor:
    """The sequence-level optimum ``π*(y) = π_ref(y) e^{r(y)/β} / Z``, ``[*B, V^T]`` probabilities.

    Computed over whole sequences, independently of soft value iteration.

    Args:
        beta: a positive scalar or ``[*B]`` tensor.
    """
    check_beta(beta)
    b = torch.as_tensor(beta, dtype=torch.float64)
    ref_seq = sequence_logprobs(params.build(), params.ref_logp())  # [V^T]
    return torch.softmax(ref_seq + params.sequence_rewards() / b[..., None], dim=-1)


class TokenTreeEnv(TabularEnv):
    """``reflab/TokenTree-v0``: observation ``Discrete(n_prefixes)`` (the prefix state), action
    ``Discrete(vocab)`` (the next token); ``length`` steps, the reward on the last one."""

    params_cls = TokenTreeParams

    def _render_ansi(self) -> str:
        V = self.params.vocab
        if self.state is not None:
            return f"prefix {list(prefix_of_state(self.state, V))}"
        if self.last_state is not None:
            sequence = list(prefix_of_state(self.last_state, V)) + [self.last_action]
            return f"sequence {sequence}: reward {self.last_reward:+.4f}"
        return "no episode yet: reset()"
