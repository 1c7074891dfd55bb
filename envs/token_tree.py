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
``"prefix"`` pays 1 for every sequence that starts with ``target`` (a verifiable answer followed by any
continuation: with ``eos``, its length carries no reward);
``"table"`` reads ``reward_table`` (one value per sequence, in sequence order); ``"random"`` draws standard
normals from ``reward_seed``. ``length_penalty`` subtracts that much per token of the sequence.

Variable length (``eos``): with ``eos`` set, an extra action (index ``V``) ends the sequence at any prefix,
the reference giving it probability ``eos`` at every prefix (the tokens share the rest as before); an episode
ends at EOS or after ``T`` tokens. The sequences are then every prefix followed by EOS (numbered by its
state, ``[0, S)``) and every full sequence (``S + code``), lengths 0 … T; the tree still has no merging
paths, so the exact oracles stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from envs.gym_shell import TabularEnv
from envs.params import EnvParams, check_beta, check_choice, check_float, check_floats, check_int, set_field
from envs.tabular import TabularMDP

REWARDS = ("target", "prefix", "table", "random")
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
        reward: ``"target"``, ``"prefix"``, ``"table"`` or ``"random"`` (see the module docstring).
        target: the rewarded sequence for ``"target"`` (default all zeros; ``T`` tokens in ``[0, V)``, fewer with
            ``eos``), or the rewarded prefix for ``"prefix"`` (default the single token 0).
        reward_table: ``V^T`` sequence rewards for ``"table"``, in sequence-code order.
        reward_seed: seed of the ``"random"`` rewards.
        eos: the reference's end-of-sequence probability at every prefix (in (0, 1)), or none for fixed-length
            sequences (no EOS action).
        length_penalty: reward subtracted per token of a sequence.
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
    eos: float | None = None
    length_penalty: float = 0.0

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
        if self.eos is not None:
            eos = check_float("eos", self.eos, positive=True)
            if eos >= 1:
                raise ValueError(f"env.eos must be in (0, 1) (the reference's end-of-sequence probability; got {eos})")
            set_field(self, "eos", eos)
        set_field(self, "length_penalty", check_float("length_penalty", self.length_penalty))
        if self.target is not None:
            tokens = self.target if len(self.target) else ()
            target = tuple(check_int("target", y) for y in (check_floats("target", tokens) if tokens else ()))
            if len(target) > T or (len(target) < T and self.eos is None and self.reward != "prefix"):
                allowed = f"{T} entries" if self.eos is None else f"at most {T} entries (env.eos is set)"
                raise ValueError(f"env.target must have {allowed}; got {len(target)}")
            if target and (min(target) < 0 or max(target) >= V):
                raise ValueError(f"env.target tokens must lie in [0, {V}) (got {list(target)})")
            set_field(self, "target", target)
        n_seq = self.n_sequences
        if self.reward_table is not None:
            set_field(self, "reward_table", check_floats("reward_table", self.reward_table, length=n_seq))
        elif self.reward == "table":
            raise ValueError(f"env.reward_table ({n_seq} values) is required for env.reward='table'")
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
        """Number of whole sequences: ``V^T``, plus the ``S`` EOS-ended ones with ``eos``."""
        return self.vocab**self.length + (self.n_prefixes if self.eos is not None else 0)

    def sequence_lengths(self) -> Tensor:
        """``[n_sequences]`` int64 number of tokens of every sequence (EOS not counted), in sequence order."""
        full = torch.full((self.vocab**self.length,), self.length, dtype=torch.long)
        if self.eos is None:
            return full
        return torch.cat([_prefix_lengths(self.vocab, self.length), full])

    def sequence_rewards(self) -> Tensor:
        """``[n_sequences]`` float64 reward of every sequence, in sequence order (see the module docstring)."""
        n = self.n_sequences
        if self.reward == "table":
            rewards = torch.tensor(self.reward_table, dtype=torch.float64)
        elif self.reward == "random":
            g = torch.Generator().manual_seed(self.reward_seed)
            rewards = torch.randn(n, generator=g, dtype=torch.float64)
        elif self.reward == "prefix":
            target = torch.tensor(self.target if self.target is not None else (0,), dtype=torch.long)
            k = target.numel()
            full = (sequence_tokens(self.vocab, self.length)[:, :k] == target).all(-1)
            if self.eos is not None:
                ended = torch.tensor([prefix_of_state(p, self.vocab)[:k] == tuple(target.tolist())
                                      for p in range(self.n_prefixes)])
                full = torch.cat([ended, full])
            rewards = full.to(torch.float64)
        else:
            target = self.target if self.target is not None else (0,) * self.length
            rewards = torch.zeros(n, dtype=torch.float64)
            offset = self.n_prefixes if self.eos is not None else 0
            state = state_of_prefix(target, self.vocab)
            rewards[state if len(target) < self.length else state - self.n_prefixes + offset] = 1.0
        if self.length_penalty:
            rewards = rewards - self.length_penalty * self.sequence_lengths().to(torch.float64)
        return rewards

    def ref_logp(self) -> Tensor:
        """``[S, V]`` (``[S, V + 1]`` with ``eos``) float64 log-probabilities of the reference at every prefix."""
        if self.ref_logits is not None:
            logits = torch.tensor(self.ref_logits, dtype=torch.float64)
        else:
            g = torch.Generator().manual_seed(self.ref_logits_seed)
            logits = torch.randn(self.n_prefixes, self.vocab, generator=g, dtype=torch.float64)
        logp = torch.log_softmax(logits / self.ref_temperature, dim=-1)
        if self.eos is None:
            return logp
        eos = torch.full((self.n_prefixes, 1), math.log(self.eos), dtype=torch.float64)
        return torch.cat([logp + math.log1p(-self.eos), eos], dim=-1)

    def sequence_logprobs(self, logp: Tensor) -> Tensor:
        """Exact log-probabilities ``[..., n_sequences]`` of every sequence under ``logp [..., S, A]``."""
        return _sequence_logprobs(self.vocab, self.length, self.eos is not None, logp)

    def build(self) -> TabularMDP:
        """The tree as a layered :class:`TabularMDP` (``K = 1``; features: one-hot prefix ``[S, S]``); with
        ``eos`` the last action ends the episode from any prefix."""
        V, T, S = self.vocab, self.length, self.n_prefixes
        state = torch.arange(S)
        length_of = _prefix_lengths(V, T)
        code = state - (V**length_of - 1) // (V - 1)
        child_code = code[:, None] * V + torch.arange(V)  # [S, V]
        last = (length_of == T - 1)[:, None]
        next_state = torch.where(last, S, (V ** (length_of[:, None] + 1) - 1) // (V - 1) + child_code)
        # child codes of the last layer are whole-sequence codes; earlier ones stay below V^(T-1)
        seq_rewards = self.sequence_rewards()
        offset = S if self.eos is not None else 0
        reward = torch.where(last, seq_rewards[offset + child_code.clamp(max=V**T - 1)],
                             torch.zeros((), dtype=torch.float64))
        if self.eos is not None:  # EOS at prefix p: the sequence p, numbered p
            next_state = torch.cat([next_state, torch.full((S, 1), S, dtype=torch.long)], 1)
            reward = torch.cat([reward, seq_rewards[:S, None]], 1)
        A = next_state.shape[1]
        mdp = TabularMDP(
            next_state=next_state[..., None],
            next_prob=torch.ones(S, A, 1, dtype=torch.float64),
            reward=reward[..., None],
            init_prob=torch.nn.functional.one_hot(torch.tensor(0), S).to(torch.float64),
            ref_logp=self.ref_logp(),
            horizon=T,
            features=torch.eye(S, dtype=torch.float32),
            state_time=length_of,
        )
        mdp.validate()
        return mdp


def _prefix_lengths(vocab: int, length: int) -> Tensor:
    """``[S]`` int64 length of every prefix state."""
    out = torch.zeros(n_prefixes_of(vocab, length), dtype=torch.long)
    for l in range(1, length):
        out[n_prefixes_of(vocab, l):] = l
    return out


def _vocab_length_eos(mdp: TabularMDP) -> tuple[int, int, bool]:
    """``(V, T, eos)`` of a token-tree MDP (a tree of length 1 is read as having no EOS action)."""
    A, T = mdp.n_actions, mdp.horizon
    if mdp.n_states == n_prefixes_of(A, T):
        return A, T, False
    if A > 2 and mdp.n_states == n_prefixes_of(A - 1, T):
        return A - 1, T, True
    raise ValueError(f"not a token-tree MDP: {mdp.n_states} states for {A} actions and length {T}")


def _sequence_logprobs(V: int, T: int, eos: bool, logp: Tensor) -> Tensor:
    states = sequence_states(V, T).to(logp.device)
    tokens = sequence_tokens(V, T).to(logp.device)
    full = logp[..., states, tokens].sum(-1)  # [..., V^T]
    if not eos:
        return full
    # log-probability of reaching each prefix: the parent's plus its token, layer by layer
    S = n_prefixes_of(V, T)
    reach = torch.zeros(logp.shape[:-1], dtype=logp.dtype, device=logp.device)  # [..., S]
    for l in range(1, T):
        first, end = n_prefixes_of(V, l), n_prefixes_of(V, l + 1)
        child = torch.arange(first, end, device=logp.device)
        parent = n_prefixes_of(V, l - 1) + (child - first) // V
        token = (child - first) % V
        reach[..., first:end] = reach[..., parent] + logp[..., parent, token]
    return torch.cat([reach + logp[..., :S, V], full], dim=-1)


def sequence_logprobs(mdp: TabularMDP, logp: Tensor) -> Tensor:
    """Exact log-probabilities ``[..., n_sequences]`` of every sequence under the policy ``logp [..., S, A]``
    (sequence order as :meth:`TokenTreeParams.sequence_rewards`)."""
    return _sequence_logprobs(*_vocab_length_eos(mdp), logp)


def sequence_probs(mdp: TabularMDP, logp: Tensor) -> Tensor:
    """Exact probabilities ``[..., n_sequences]`` of every sequence under the policy ``logp [..., S, A]``."""
    return sequence_logprobs(mdp, logp).exp()


def gibbs_sequence_optimum(params: TokenTreeParams, beta: float | Tensor) -> Tensor:
    """The sequence-level optimum ``π*(y) = π_ref(y) e^{r(y)/β} / Z``, ``[*B, n_sequences]`` probabilities.

    Computed over whole sequences, independently of soft value iteration.

    Args:
        beta: a positive scalar or ``[*B]`` tensor.
    """
    check_beta(beta)
    b = torch.as_tensor(beta, dtype=torch.float64)
    ref_seq = params.sequence_logprobs(params.ref_logp())  # [n_sequences]
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
