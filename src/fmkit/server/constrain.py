"""Constrained decoding for ``response_format`` json_object / json_schema: every output parses as JSON and
validates against the schema. Pure Python, standard library only.

How: the schema is compiled into a graph of ``_Node`` (a ``$ref`` shares its target's node: recursion stays finite).
A character-level pushdown machine reads the text: a configuration is an immutable linked stack of frames, and the
state after a text a short list of configurations (``anyOf`` is the only ambiguity). As frames never change, the
state of ``text`` is computed once, incrementally as it grows, and each candidate piece is fed from it: that keeps
``pick`` cheap. ``finish`` closes the frames top-down with the shortest text each needs (per node from a fixpoint;
branches without a finite document are pruned, so every viable text can be finished).

Accepted is a subset of what the schema allows, so that a model never gets stuck: compact JSON (no whitespace
outside strings, so no looping on spaces); keys in the schema's declared order (optional ones may be skipped, all
required ones before ``}``) spelled as ``json.dumps`` spells them; extra keys (additionalProperties absent, true or
a schema) only after the declared ones and never equal to one; enum/const values as their compact ``json.dumps``
text; no ``\\u`` escapes of surrogates; numbers with bounds (minimum, maximum, exclusive*) without exponent and at
most 15 digits, which keeps the range check exact (decimal and float comparisons agree there).
Keywords: type (or a list), properties, required, additionalProperties, enum, const, items, prefixItems, minItems,
maxItems, minLength, maxLength, minimum, maximum, exclusiveMinimum, exclusiveMaximum, anyOf, oneOf (as anyOf:
overlapping branches may both match), allOf with one entry, $ref to ``#``, ``#/$defs/X`` or ``#/definitions/X``.
Ignored: description, title, default, $schema, examples, strict, format, $comment. Others raise ValueError.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from decimal import ROUND_CEILING, Decimal
from itertools import islice

_TYPES = frozenset({'object', 'array', 'string', 'number', 'integer', 'boolean', 'null'})
_IGNORED = set('description title default $schema examples strict format $comment $defs definitions'.split())
_KNOWN = set('type properties required additionalProperties enum const items prefixItems minItems maxItems minLength '
             'maxLength minimum maximum exclusiveMinimum exclusiveMaximum anyOf oneOf allOf $ref'.split())
_CAP = 15                       # most digits of a bounded number
_ESC_FIX = {0: '', 1: 'n', 2: '0000', 3: '000', 4: '000', 5: '00', 6: '0'}   # shortest end of a pending escape
_NUMBER = re.compile(r'-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?')               # a whole JSON number
_NUM_PREFIX = re.compile(r'-?((0|[1-9][0-9]*)(\.[0-9]*|\.[0-9]+[eE][+-]?[0-9]*|[eE][+-]?[0-9]*)?)?')   # a prefix


def _str_char(esc: int, ch: str) -> int | None:
    """A string character: new escape state (0 plain, 1 after '\\', 2-6 in ``\\uXXXX``), -1 closing quote, None bad."""
    if esc == 0:
        return -1 if ch == '"' else 1 if ch == '\\' else 0 if ch >= ' ' else None
    if esc == 1:
        return 0 if ch in '"\\/bfnrt' else 2 if ch == 'u' else None
    if ch not in '0123456789abcdefABCDEF' or (esc == 4 and ch in '89abcdefABCDEF'):   # esc 4: no surrogates
        return None
    return (4 if ch in 'dD' else 3) if esc == 2 else 5 if esc in (3, 4) else 6 if esc == 5 else 0


def _in_range(nd: _Node, text: str) -> bool:
    """The exact check jsonschema makes on the value json.loads gives for a complete number."""
    v = float(text) if '.' in text or 'e' in text or 'E' in text else int(text)
    return ((nd.lo is None or v > nd.lo or (v == nd.lo and not nd.lo_ex))
            and (nd.hi is None or v < nd.hi or (v == nd.hi and not nd.hi_ex)))


def _num_suffix(nd: _Node, integer: bool, text: str) -> str | None:
    """Shortest-ish text to append to the number prefix ``text`` for a complete in-range number, None if none.
    It works on the magnitude, which is never negative: for a negative number the bounds swap."""
    if nd.lo is None and nd.hi is None:
        return '0' if not text or text[-1] in '-+.eE' else ''
    neg = text.startswith('-')
    ip, dot, fp = text[neg:].partition('.')
    lo, hi = (None if v is None else Decimal(repr(v)) * (-1 if neg else 1) for v in (nd.lo, nd.hi))
    (mlo, mlo_ex), (mhi, mhi_ex) = ((hi, nd.hi_ex), (lo, nd.lo_ex)) if neg else ((lo, nd.lo_ex), (hi, nd.hi_ex))
    if mlo is None or mlo < 0:
        mlo, mlo_ex = Decimal(0), False
    # the magnitudes this prefix can still reach, as [a, b) spans (b None: unbounded) with their fewest decimals
    a = Decimal(ip + '.' + fp if fp else ip or '0')
    spans = ([(a, a + Decimal(10) ** -len(fp), max(len(fp), 1))] if dot else [(a, None, 0)] if not ip
             else [(a * 10 ** n, (a + 1) * 10 ** n, 0) for n in range(1 if ip == '0' else _CAP + 1 - len(ip))])
    for a, b, kmin in spans:
        low, low_ex = (a, False) if a > mlo else (mlo, mlo_ex)
        if (mhi is not None and low > mhi) or (b is not None and low >= b):
            continue
        for k in range(kmin, (0 if integer else _CAP) + 1):   # the smallest value with k decimals in the span
            q = Decimal(10) ** -k
            c = (low / q).to_integral_value(ROUND_CEILING) * q
            c += q if low_ex and c == low else 0
            if (b is not None and c >= b) or (mhi is not None and (c > mhi or (c == mhi and mhi_ex))):
                continue
            full = ('-' if neg else '') + f'{c:.{k}f}'
            if full.startswith(text) and sum(ch.isdigit() for ch in full) <= _CAP and _in_range(nd, full):
                return full[len(text):]
    return None


class _Node:
    """One compiled (sub)schema. ``alts`` (anyOf) or ``lits`` (enum/const texts) replace the type fields."""

    def __init__(self, registry: list, kinds=_TYPES):
        registry.append(self)
        self.kinds, self.alts, self.lits, self.prefix = kinds, None, None, []
        self.props: list = []       # (key as json.dumps spells it, node, required) in declared order
        self.names: set = set()     # every declared property name: extra keys must differ from all of them
        self.first_req = [0]        # first_req[i]: index of the first required property at or after i
        self.extra = self.items = None          # nodes for extra keys / items after prefixItems; None: not allowed
        self.min_items, self.max_items, self.min_len, self.max_len, self.lo, self.hi = 0, None, 0, None, None, None
        self.lo_ex = self.hi_ex = False

    def item(self, i: int) -> _Node | None:
        return self.prefix[i] if i < len(self.prefix) else self.items


class JsonConstraint:
    """Which texts are prefixes of (or whole) compact JSON documents valid for ``schema`` (None: any object)."""

    def __init__(self, schema: dict | None):
        self._nodes: list[_Node] = []
        self._done: dict[int, _Node | None] = {}    # id(schema dict) -> its node (None: an alias being resolved)
        self._schema, self._any = schema, _Node(self._nodes)
        self._any.extra = self._any.items = self._any
        root = self._compile(schema if schema is not None else {'type': 'object'}, '#')
        self._solve()
        if root not in self._min:
            raise ValueError('schema admits no finite JSON document')
        self._init = [(('V', root), None)]
        self._last = ('', self._init)           # (text, state) of the latest query: texts grow token by token

    def _compile(self, s, path: str) -> _Node:
        if isinstance(s, bool):
            return self._any if s else _Node(self._nodes, frozenset())
        if not isinstance(s, dict):
            raise ValueError(f'schema at {path} must be an object or a boolean')
        if id(s) in self._done:
            if self._done[id(s)] is None:
                raise ValueError(f'$ref loop at {path}')
            return self._done[id(s)]
        keys = set(s) - _IGNORED
        for k in sorted(keys - _KNOWN):
            raise ValueError(f'unsupported schema keyword {k!r} at {path}')
        for k in sorted(keys & {'$ref', 'allOf', 'anyOf', 'oneOf'}):
            if len(keys) > 1:
                raise ValueError(f'{k!r} combined with {min(keys - {k})!r} is not supported at {path}')
        if keys & {'$ref', 'allOf'}:    # an alias: this schema's node is its target's
            if 'allOf' in keys and not (isinstance(s['allOf'], list) and len(s['allOf']) == 1):
                raise ValueError(f"'allOf' with more than one entry is not supported at {path}")
            self._done[id(s)] = None
            target = s['allOf'][0] if 'allOf' in keys else self._resolve(s['$ref'], path)
            self._done[id(s)] = self._compile(target, path + '/allOf/0' if 'allOf' in keys else s['$ref'])
            return self._done[id(s)]
        nd = self._done[id(s)] = _Node(self._nodes)   # registered before its children, so recursive $refs find it
        k = 'anyOf' if 'anyOf' in keys else 'oneOf' if 'oneOf' in keys else None
        if k:
            nd.alts = [self._compile(x, f'{path}/{k}/{i}') for i, x in enumerate(s[k])]
            return nd
        nd.kinds = frozenset([s['type']] if isinstance(s.get('type'), str) else s.get('type', _TYPES))
        if not nd.kinds <= _TYPES:
            raise ValueError(f'unsupported type {s["type"]!r} at {path}')
        if keys & {'enum', 'const'}:
            for k in sorted(keys - {'type', 'enum' if 'enum' in keys else 'const'}):
                raise ValueError(f"'enum'/'const' combined with {k!r} is not supported at {path}")
            texts = dict.fromkeys(json.dumps(v, separators=(',', ':'), ensure_ascii=False)
                                  for v in (s['enum'] if 'enum' in s else [s['const']]))
            probe = _Node([], nd.kinds)     # keep the values of the given type(s): the machine itself tells
            probe.extra = probe.items = self._any
            nd.lits = tuple(t for t in texts if any(map(self._ends, self._feed([(('V', probe), None)], t))))
            return nd
        props, required = s.get('properties', {}), list(dict.fromkeys(s.get('required', [])))
        nd.extra = self._compile(s.get('additionalProperties', True), path + '/additionalProperties')
        nd.names = set(props) | set(required)
        nd.props = [(json.dumps(k, ensure_ascii=False)[1:-1], self._compile(v, f'{path}/properties/{k}'),
                     k in required) for k, v in props.items()]
        nd.props += [(json.dumps(k, ensure_ascii=False)[1:-1], nd.extra, True) for k in required if k not in props]
        nd.items = self._compile(s.get('items', True), path + '/items')
        nd.prefix = [self._compile(x, f'{path}/prefixItems/{i}') for i, x in enumerate(s.get('prefixItems', []))]
        nd.min_items, nd.max_items = s.get('minItems', 0), s.get('maxItems')
        nd.min_len, nd.max_len = s.get('minLength', 0), s.get('maxLength')
        for k in ('minimum', 'exclusiveMinimum', 'maximum', 'exclusiveMaximum'):   # keep the tightest bounds
            v, ex = s.get(k), k.startswith('ex')
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f'{k!r} must be a number at {path}')
            if v is not None and 'inimum' in k and (nd.lo is None or v > nd.lo or (v == nd.lo and ex)):
                nd.lo, nd.lo_ex = v, ex
            if v is not None and 'aximum' in k and (nd.hi is None or v < nd.hi or (v == nd.hi and ex)):
                nd.hi, nd.hi_ex = v, ex
        return nd

    def _resolve(self, ref, path: str):
        head, _, name = str(ref).rpartition('/')
        if ref == '#' or (head in ('#/$defs', '#/definitions') and name in (self._schema.get(head[2:]) or {})):
            return self._schema if ref == '#' else self._schema[head[2:]][name]
        raise ValueError(f'unsupported $ref {ref!r} at {path}')

    def _solve(self) -> None:
        """Shortest document per node (a fixpoint: recursion is fine); then prune what has none: no dead ends."""
        self._min: dict[_Node, str] = {}
        for _ in range(len(self._nodes) + 1):   # round i knows every shortest document nesting i nodes deep
            new = {nd: t for nd in self._nodes if (t := self._min_of(nd)) is not None}
            if new == self._min:
                break
            self._min = new
        ok = self._min.__contains__
        for nd in self._nodes:
            nd.kinds = frozenset(k for k in nd.kinds if self._kind_min(nd, k) is not None)  # before props change
            nd.alts = None if nd.alts is None else [a for a in nd.alts if ok(a)]
            nd.props = [p for p in nd.props if ok(p[1])]
            nd.extra, nd.items = (x if x is not None and ok(x) else None for x in (nd.extra, nd.items))
            dead = [i for i, p in enumerate(nd.prefix) if not ok(p)] + [nd.max_items]
            nd.max_items = None if dead[0] is None else min(x for x in dead if x is not None)
            nd.first_req = [next((j for j, p in enumerate(nd.props) if p[2] and j >= i), len(nd.props))
                            for i in range(len(nd.props) + 1)]

    def _min_of(self, nd: _Node) -> str | None:
        opts = ([self._min.get(a) for a in nd.alts] if nd.alts is not None else list(nd.lits)
                if nd.lits is not None else [self._kind_min(nd, k) for k in nd.kinds])
        return min((o for o in opts if o is not None), key=len, default=None)

    def _kind_min(self, nd: _Node, k: str) -> str | None:
        """Shortest document of type ``k`` under ``nd`` (None: none known yet)."""
        if k in ('null', 'boolean'):
            return 'null' if k == 'null' else 'false'
        if k in ('number', 'integer'):
            pos, neg = _num_suffix(nd, k == 'integer', ''), _num_suffix(nd, k == 'integer', '-')
            return pos if pos is not None else neg and '-' + neg
        if k == 'string':
            return None if nd.max_len is not None and nd.max_len < nd.min_len else '"' + 'a' * nd.min_len + '"'
        if k == 'array':
            parts = [self._min.get(nd.item(i)) for i in range(nd.min_items)]
            ok = None not in parts and (nd.max_items is None or nd.max_items >= nd.min_items)
            return '[' + ','.join(parts) + ']' if ok else None
        rest = self._rest(nd, 0, True)
        return rest and '{' + rest

    def _start(self, nd: _Node, ch: str, up, out: list) -> None:
        """``ch`` begins a value of ``nd``."""
        if nd.alts is not None:
            for a in nd.alts:
                self._start(a, ch, up, out)
        elif nd.lits is not None:
            self._step((('L', nd.lits, 0), up), ch, out)
        elif ch == '{' and 'object' in nd.kinds:
            out.append((('O', nd, 'start', 0, '', 0, None), up))
        elif ch == '[' and 'array' in nd.kinds:
            out.append((('A', nd, 'start', 0), up))
        elif ch == '"' and 'string' in nd.kinds:
            out.append((('S', nd, 0, 0), up))
        elif ch in '-0123456789' and nd.kinds & {'number', 'integer'}:
            self._step((('N', nd, 'number' not in nd.kinds, ''), up), ch, out)
        elif (ch in 'tf' and 'boolean' in nd.kinds) or (ch == 'n' and 'null' in nd.kinds):
            self._step((('L', ('true', 'false') if ch != 'n' else ('null',), 0), up), ch, out)

    def _step(self, stack, ch: str, out: list) -> None:
        """The machine: append to ``out`` the configurations that ``stack`` becomes after ``ch``."""
        if stack is None:
            return                      # the document is complete: nothing may follow
        f, up = stack
        tag = f[0]
        if tag == 'V':
            self._start(f[1], ch, up, out)
        elif tag == 'S':
            _, nd, count, esc = f
            r = _str_char(esc, ch)
            if r == -1 and count >= nd.min_len:
                out.append(up)
            elif r is not None and r != -1 and not (esc == 0 and nd.max_len is not None and count >= nd.max_len):
                out.append((('S', nd, count + (esc == 0), r), up))   # esc 0: a new character (or escape) begins
        elif tag == 'N':
            _, nd, integer, text = f
            t, bounded = text + ch, nd.lo is not None or nd.hi is not None
            if _NUM_PREFIX.fullmatch(t) and not (integer and '.' in t) and not ((integer or bounded) and (
                    'e' in t or 'E' in t)) and (not bounded or _num_suffix(nd, integer, t) is not None):
                out.append((('N', nd, integer, t), up))
            elif _NUMBER.fullmatch(text) and _in_range(nd, text):
                self._step(up, ch, out)     # the number ended: the character belongs to the container
        elif tag == 'L':
            _, cands, pos = f
            more = tuple(c for c in cands if len(c) > pos and c[pos] == ch)
            if more:
                out.append((('L', more, pos + 1), up))
            if pos and any(len(c) == pos for c in cands):
                self._step(up, ch, out)     # a literal ended (enum [1, 12] can do both)
        elif tag == 'A':
            _, nd, st, n = f
            item = nd.item(n)
            room = item is not None and (nd.max_items is None or n < nd.max_items)
            if ch == ']' and n >= nd.min_items:
                out.append(up)
            elif ch == ',' and st == 'after' and room:
                out.append((('V', item), (('A', nd, 'after', n + 1), up)))
            elif st == 'start' and room:
                self._start(item, ch, (('A', nd, 'after', 1), up), out)   # the first item begins
        else:
            self._obj(f, ch, up, out)

    def _obj(self, f, ch: str, up, out: list) -> None:
        _, nd, st, idx, raw, esc, child = f
        n, no_req = len(nd.props), nd.first_req[idx] == len(nd.props)
        if ch == '}' and st in ('start', 'after') and no_req:
            out.append(up)
        elif ch == ',' and st == 'after' and (idx < n or nd.extra is not None):   # something must be able to follow
            out.append((('O', nd, 'comma', idx, '', 0, None), up))
        elif ch == '"' and st in ('start', 'comma'):
            out.append((('O', nd, 'key', idx, '', 0, None), up))
        elif ch == ':' and st == 'colon':
            out.append((('V', child), (('O', nd, 'after', idx, '', 0, None), up)))
        elif st == 'key':               # a declared key up to the first required one, or an extra key
            r = _str_char(esc, ch)
            allowed = range(idx, min(nd.first_req[idx], n - 1) + 1)
            extra_ok = nd.extra is not None and no_req
            if r == -1:
                hit = [j for j in allowed if nd.props[j][0] == raw]
                if hit:
                    out.append((('O', nd, 'colon', hit[0] + 1, '', 0, nd.props[hit[0]][1]), up))
                elif extra_ok and json.loads('"' + raw + '"') not in nd.names:
                    out.append((('O', nd, 'colon', n, '', 0, nd.extra), up))
            elif r is not None:
                raw += ch
                if extra_ok or any(nd.props[j][0].startswith(raw) for j in allowed):
                    out.append((('O', nd, 'key', idx, raw, r, None), up))

    def _feed(self, state: list, s: str) -> list:
        for ch in s:
            out: list = []
            for stack in state:
                self._step(stack, ch, out)
            state = list(dict.fromkeys(out)) if len(out) > 1 else out
        return state

    def _state(self, text: str) -> list:
        last, state = self._last
        if text != last:
            state = self._feed(state, text[len(last):]) if text.startswith(last) else self._feed(self._init, text)
            self._last = (text, state)
        return state

    def _close(self, f) -> str:
        """Shortest text that completes frame ``f`` (what its container still needs comes from the frame below)."""
        tag, nd = f[0], f[1]
        if tag == 'V':
            return self._min[nd]
        if tag == 'S':
            return _ESC_FIX[f[3]] + 'a' * max(0, nd.min_len - f[2]) + '"'
        if tag == 'N':
            return _num_suffix(nd, f[2], f[3]) or ''
        if tag == 'L':
            return min(nd, key=len)[f[2]:]      # nd: the literals still possible
        if tag == 'A':
            need = [self._min[nd.item(i)] for i in range(f[3], nd.min_items)]
            return (','.join(need) if f[2] == 'start' else ''.join(',' + t for t in need)) + ']'
        _, nd, st, idx, raw, esc, child = f
        n = len(nd.props)
        if st in ('start', 'after') or (st == 'comma' and nd.first_req[idx] < n):
            return self._rest(nd, idx, st != 'after')
        if st == 'colon':
            return ':' + self._min[child] + self._rest(nd, idx, False)
        # after a comma some member must follow; inside a key, it must be finished: take the shortest way
        opts = [p[0][len(raw):] + '":' + self._min[p[1]] + self._rest(nd, j + 1, False)
                for j in range(idx, min(nd.first_req[idx], n - 1) + 1) for p in [nd.props[j]] if p[0].startswith(raw)]
        if nd.extra is not None and nd.first_req[idx] == n:
            key = _ESC_FIX[esc]
            while json.loads('"' + raw + key + '"') in nd.names:
                key += 'a'
            opts.append(key + '":' + self._min[nd.extra] + '}')
        return ('' if st == 'key' else '"') + min(opts, key=len)

    def _rest(self, nd: _Node, idx: int, first: bool) -> str | None:
        """The required members from property ``idx`` on, then ``}`` (None: one has no known document yet)."""
        need = [(key, self._min.get(child)) for key, child, req in nd.props[idx:] if req]
        return None if any(m is None for _, m in need) else (
            (',' if need and not first else '') + ','.join(f'"{key}":{m}' for key, m in need) + '}')

    def _tail(self, state: list) -> str:
        """The shortest finish over the configurations of ``state``: close every frame, top first."""
        tails = []
        for stack in state:
            tails.append('')
            while stack is not None:
                tails[-1], stack = tails[-1] + self._close(stack[0]), stack[1]
        return min(tails, key=len)

    @staticmethod
    def _ends(stack) -> bool:
        """A whole document: nothing left, or only a top-level number or literal that may end here."""
        if stack is None:
            return True
        f, up = stack
        return up is None and bool(_NUMBER.fullmatch(f[3]) and _in_range(f[1], f[3]) if f[0] == 'N'
                                   else f[0] == 'L' and any(len(c) == f[2] for c in f[1]))

    def viable(self, text: str) -> bool:
        """``text`` is a prefix of at least one document this constraint accepts."""
        return bool(self._state(text))

    def complete(self, text: str) -> bool:
        """``text`` is a whole accepted document (for a top-level number, more digits could still follow)."""
        return any(self._ends(s) for s in self._state(text))

    def finish(self, text: str) -> str:
        """A short suffix ``s`` with ``complete(text + s)``, for a viable ``text`` (ValueError otherwise)."""
        state = self._state(text)
        if not state:
            raise ValueError('text is not a prefix of any accepted JSON document')
        return self._tail(state)


class TokenGuide:
    """Chooses tokens under a JsonConstraint for a tokenizer whose token pieces (pieces[i] = decode([i])) are given;
    pieces that are '' or hold '\\ufffd' (partial UTF-8) are never chosen.

    ``forced(text, budget, encode)`` records the budget; the next ``pick``/``allowed_mask`` on that text refuses
    tokens after which the finish would not fit in the tokens left. One token can lengthen the finish a lot (an
    opening quote commits to a key and its value): this lookahead is what makes "parses within max_tokens" hold."""

    def __init__(self, constraint: JsonConstraint, pieces: list[str], eos_id: int | None):
        self.constraint, self.pieces, self.eos_id = constraint, pieces, eos_id
        self._usable = [bool(p) and '\ufffd' not in p for p in pieces]
        self._budget = None     # (text, budget, encode, {finish: its token count}) from the latest forced()

    def _after(self, text: str, state: list, tid: int) -> list:
        """The state after piece ``tid``, or [] if it does not fit the grammar or the recorded budget."""
        ok = 0 <= tid < len(self.pieces) and self._usable[tid]
        nxt = self.constraint._feed(state, self.pieces[tid]) if ok else []
        if nxt and self._budget is not None and self._budget[0] == text:
            _, budget, encode, sizes = self._budget
            tail = self.constraint._tail(nxt)
            if tail not in sizes:       # many candidates share a finish (e.g. every piece inside one string)
                sizes[tail] = len(encode(tail)) if tail else 0
            return nxt if sizes[tail] <= budget - 1 else []
        return nxt

    def pick(self, text: str, ranked: Iterable[int], limit: int = 4096) -> int | None:
        """The first of ``ranked`` (token ids, best first) whose piece keeps ``text`` viable, or ``eos_id`` when it
        comes up and ``text`` is complete. None if none of the first ``limit`` fits (a complete text: ``eos_id``)."""
        state = self.constraint._state(text)
        done = any(self.constraint._ends(s) for s in state)
        for tid in map(int, islice(ranked, limit)):
            if done if tid == self.eos_id else self._after(text, state, tid):
                return tid
        return self.eos_id if done else None

    def allowed_mask(self, text: str) -> list[bool]:
        """Per token id, whether ``pick`` could choose it, for sampling at temperature > 0. It feeds every piece, so
        it is slow (up to ~1 s for a 50k vocabulary, most when many pieces fit): ``pick`` on a ranking is cheaper."""
        state = self.constraint._state(text)
        mask = [bool(self._after(text, state, tid)) for tid in range(len(self.pieces))]
        if self.eos_id is not None:
            mask += [False] * (self.eos_id + 1 - len(mask))     # eos may lie past the decoded pieces
            mask[self.eos_id] = any(self.constraint._ends(s) for s in state)
        return mask

    def forced(self, text: str, budget: int, encode: Callable[[str], list[int]]) -> list[int] | None:
        """``encode(finish(text))`` when those tokens are >= budget - 1, so the caller emits them and stops; else
        None. Also records ``budget`` for the next ``pick`` on ``text`` (see the class docstring)."""
        tail = self.constraint.finish(text)
        ids = list(encode(tail)) if tail else []
        self._budget = (text, budget, encode, {tail: len(ids)})
        return ids if len(ids) >= budget - 1 else None
