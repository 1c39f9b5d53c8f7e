"""JSON-constrained decoding: the grammar on hand-written prefixes, `finish` on every prefix of valid documents,
and random walks through a small vocabulary that must always end in a valid document within the token budget."""
from __future__ import annotations

import functools
import json
import random

import jsonschema
import pytest

from fmkit.server.constrain import JsonConstraint, TokenGuide

PERSON = {  # nested object with an array of objects
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"kind": {"type": "string"}, "legs": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["kind"], "additionalProperties": False}},
        "score": {"type": "number", "minimum": 0.5, "exclusiveMaximum": 2},
    },
    "required": ["name", "pets"],
    "additionalProperties": False,
}
ENUM = {"type": "object", "properties": {"color": {"enum": ["red", "green", 1, 12, None]},
                                         "mode": {"const": "fast"}},
        "required": ["color", "mode"], "additionalProperties": False}
NULLABLE = {"type": "object", "properties": {"x": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
                                             "y": {"oneOf": [{"type": "integer"}, {"type": "array", "minItems": 2}]}},
            "required": ["x", "y"]}
TREE = {"$ref": "#/$defs/node", "$defs": {"node": {
    "type": "object", "properties": {"v": {"type": "integer"},
                                     "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
    "required": ["v", "kids"], "additionalProperties": False}}}
BOUNDED = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10},
                                            "m": {"type": "integer", "exclusiveMinimum": -3, "maximum": -1},
                                            "t": {"type": "array", "prefixItems": [{"type": "boolean"}],
                                                  "items": False, "minItems": 1}},
           "required": ["n", "m", "t"], "additionalProperties": False}
SCHEMAS = {"person": PERSON, "enum": ENUM, "nullable": NULLABLE, "tree": TREE, "bounded": BOUNDED, "object": None}


@functools.cache
def validator(name):
    schema = SCHEMAS[name] or {"type": "object"}
    return jsonschema.validators.validator_for(schema)(schema)


def check(schema, text):
    """The text parses and validates (json_object mode: any object)."""
    name = next(k for k, v in SCHEMAS.items() if v is schema)
    validator(name).validate(json.loads(text))


@pytest.mark.parametrize("schema,good,bad", [
    (PERSON, ['{"name":"Al","pets":[]}', '{"name":"Al","age":7,"pets":[{"kind":"cat","ok":true}],"score":1.5}'],
     ['{"pets":[],"name":"Al"}', '{"name":"","pets":[]}', '{"name":"Al"}', '{"name":"Al","pets":[],"x":1}',
      '{"name":"Al","age":7.5,"pets":[]}', '{"name":"Al","age":-1,"pets":[]}', '{"name":"Al","pets":[],"score":2}',
      '{"name":"Al", "pets":[]}', '{"name":"Al","pets":[{"kind":"a","kind":"b"}]}']),
    (ENUM, ['{"color":"red","mode":"fast"}', '{"color":12,"mode":"fast"}', '{"color":null,"mode":"fast"}'],
     ['{"color":"blue","mode":"fast"}', '{"color":2,"mode":"fast"}', '{"color":"red","mode":"slow"}']),
    (NULLABLE, ['{"x":null,"y":3}', '{"x":"abc","y":[1,"a"],"z":{"q":[]}}'],
     ['{"x":"abcd","y":3}', '{"x":null,"y":[1]}', '{"x":null,"y":3,"x":null}']),
    (TREE, ['{"v":1,"kids":[{"v":2,"kids":[]},{"v":3,"kids":[{"v":4,"kids":[]}]}]}'],
     ['{"v":1,"kids":[{"v":2}]}', '{"v":1,"kids":[],"w":0}']),
    (BOUNDED, ['{"n":10,"m":-2,"t":[true]}', '{"n":123,"m":-1,"t":[false]}'],
     ['{"n":9,"m":-2,"t":[true]}', '{"n":10,"m":-3,"t":[true]}', '{"n":10,"m":0,"t":[true]}',
      '{"n":10,"m":-2,"t":[true,false]}', '{"n":1e3,"m":-2,"t":[true]}']),
    (None, ['{}', '{"a":[1,-2.5e+3,{"b":null}],"c":"\\u00e9\\n","":true}'],
     ['[]', '1', '{"a":01}', '{"a":"\\x"}', '{"a":"\x01"}', '{"a":"\\ud800"}', '{} ', '{"a":1,}', '{"a":1.}']),
])
def test_complete_and_viable(schema, good, bad):
    c = JsonConstraint(schema)
    for doc in good:
        check(schema, doc)
        assert c.complete(doc), doc
        assert all(c.viable(doc[:i]) for i in range(len(doc) + 1)), doc
        assert not c.complete(doc[:-1]) and not c.viable(doc + ',')
    for doc in bad:
        assert not c.complete(doc), doc


@pytest.mark.parametrize("schema,text", [
    (PERSON, '{"na'), (PERSON, '{"name":"Al","pets":[{"kind":"cat","legs":4'), (ENUM, '{"color":"g'),
    (NULLABLE, '{"x":n'), (TREE, '{"v":1,"kids":[{'), (BOUNDED, '{"n":1'), (BOUNDED, '{"n":10,"m":-'),
    (None, '{"a":[{"b":"\\u0')])
def test_viable_partial(schema, text):
    c = JsonConstraint(schema)
    assert c.viable(text) and not c.complete(text)
    check(schema, text + c.finish(text))


@pytest.mark.parametrize("schema,text", [
    (PERSON, '{"x'), (PERSON, '{"name":"Al","pets":[{"legs'), (PERSON, '{"name":"Al","age":-1'),
    (PERSON, '{"name":"Al","age":1e'), (PERSON, '{"name":"Al","age":1.'), (PERSON, '{"name":"Al","score":3'),
    (PERSON, '{"name":"Al","score":0.4'), (ENUM, '{"color":"b'), (ENUM, '{"color":3'), (NULLABLE, '{"x":t'),
    (BOUNDED, '{"n":-'), (BOUNDED, '{"n":0'), (BOUNDED, '{"n":10,"m":-4'), (BOUNDED, '{"n":10,"m":1'),
    (None, ' '), (None, '['), (None, '{"a":-x'), (None, '{"a":1,"b"}')])
def test_not_viable(schema, text):
    c = JsonConstraint(schema)
    assert not c.viable(text)
    with pytest.raises(ValueError):
        c.finish(text)


def test_finish_on_every_prefix():
    docs = {"person": [('{"name":"Zoé","age":42,"pets":[{"kind":"dog","legs":4,"ok":false},{"kind":"\\"q\\""}],'
                        '"score":0.75}')],
            "enum": ['{"color":12,"mode":"fast"}', '{"color":"green","mode":"fast"}'],
            "nullable": ['{"x":"ab","y":[[1],{"k":"v"}],"extra":[true,null]}'],
            "tree": ['{"v":-7,"kids":[{"v":0,"kids":[]},{"v":30,"kids":[{"v":1,"kids":[]}]}]}'],
            "bounded": ['{"n":1234,"m":-2,"t":[true]}'],
            "object": ['{"a":{"b":[1.5e-3,"x\\u0041",{}]},"c":false}']}
    for name, texts in docs.items():
        schema = SCHEMAS[name]
        c = JsonConstraint(schema)
        for doc in texts:
            for i in range(len(doc) + 1):
                out = doc[:i] + c.finish(doc[:i])
                assert c.complete(out), (doc[:i], out)
                check(schema, out)


def test_finish_respects_bounds_and_lengths():
    c = JsonConstraint({"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 5}, "b": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5},
        "c": {"type": "string", "minLength": 3}, "d": {"type": "array", "minItems": 2, "items": {"type": "null"}},
        "e": {"type": "integer", "maximum": -20}}, "required": ["a", "b", "c", "d", "e"]})
    assert c.finish("") == '{"a":5,"b":0.1,"c":"aaa","d":[null,null],"e":-20}'
    assert c.finish('{"a":1') == '0,"b":0.1,"c":"aaa","d":[null,null],"e":-20}'


@pytest.mark.parametrize("schema,word", [
    ({"type": "string", "pattern": "a+"}, "pattern"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "#/properties/a"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
    ({"$ref": "http://example.com/x"}, "$ref"),
    ({"type": "text"}, "type"),
    ({"type": "string", "anyOf": [{"maxLength": 2}]}, "anyOf"),
    ({"$defs": {"a": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"]}},
      "$ref": "#/$defs/a"}, "finite"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "finite"),
])
def test_unsupported_schemas_raise(schema, word):
    with pytest.raises(ValueError, match="(?s).*" + word.replace("$", r"\$").replace("+", r"\+")) as e:
        JsonConstraint(schema)
    assert "\n" not in str(e.value)


def test_recursion_is_lazy_and_optional_dead_branches_are_pruned():
    # an optional property whose schema has no finite document must never be offered
    c = JsonConstraint({"$defs": {"loop": {"type": "object", "properties": {"l": {"$ref": "#/$defs/loop"}},
                                           "required": ["l"]}},
                        "type": "object", "properties": {"bad": {"$ref": "#/$defs/loop"}, "ok": {"type": "null"}},
                        "additionalProperties": False})
    assert c.finish("") == "{}"
    assert not c.viable('{"b') and c.viable('{"o')


def test_odd_keys_root_refs_and_scalars():
    odd = {"type": "object", "properties": {'q"t': {"type": "null"}, "é\n": {"type": "boolean"}},
           "required": ['q"t', "é\n"], "additionalProperties": {"type": "integer"}}
    c = JsonConstraint(odd)
    assert c.finish("") == '{"q\\"t":null,"é\\n":false}'
    doc = '{"q\\"t":null,"é\\n":true,"x\\u0041":3,"":-1}'
    jsonschema.validate(json.loads(doc), odd)
    assert all(c.viable(doc[:i]) for i in range(len(doc))) and c.complete(doc)
    assert not c.viable('{"q\\"t":null,"é\\n":true,"q\\"t"')    # an extra key may not repeat a declared one
    assert not c.viable('{"q\\"t":null,"é\\n":true,"x":1.5')
    root = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"$ref": "#"}]}, "minItems": 1}
    c = JsonConstraint(root)
    assert c.finish("") == '[""]' and c.finish("[[[") == '""]]]'
    out = "[[[" + c.finish("[[[")
    jsonschema.validate(json.loads(out), root)
    c = JsonConstraint({"type": "integer", "maximum": -5})
    assert c.finish("") == "-5" and c.complete("-17") and c.viable("-170") and c.viable("-4")
    assert not c.complete("-4") and not c.viable("-17 ")
    c = JsonConstraint(None)
    assert not c.viable('{ "a":1}') and not c.viable('{"a": 1}') and c.viable('{"a":" x "')


VOCAB = [chr(i) for i in range(32, 127)] + [
    '":"', '"},{"', '":', ',"', 'true', 'false', 'null', '12', '-0', '0.5', 'ab', '"}', ']}', '[{"', 'é', '\\u00',
    '\\n', '"name":"', 'kind', '"pets":[', '{"v":', '"kids":[]}', '\n', '', '\ufffd', 'a\ufffd', '1e']
EOS = len(VOCAB)
USABLE = sorted((p for p in VOCAB if p and "\ufffd" not in p), key=len, reverse=True)


@functools.cache
def encode(text: str) -> list[int]:
    """Greedy longest-match tokenization over the usable pieces (what a real tokenizer roughly does)."""
    ids, i = [], 0
    while i < len(text):
        p = next(p for p in USABLE if text.startswith(p, i))
        ids.append(VOCAB.index(p))
        i += len(p)
    return ids


def shuffled(rng, n):
    """A random ranking of n token ids, drawn lazily (pick stops at the first that fits)."""
    ids = list(range(n))
    for i in range(n):
        j = rng.randrange(i, n)
        ids[i], ids[j] = ids[j], ids[i]
        yield ids[i]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_walks_end_valid_within_budget(name):
    schema = SCHEMAS[name]
    c = JsonConstraint(schema)
    guide = TokenGuide(c, VOCAB, EOS)
    rng = random.Random(name)
    for _ in range(200):
        budget, text, used = rng.randint(20, 80), "", []
        while True:
            forced = guide.forced(text, budget - len(used), encode)
            if forced is not None:
                used += forced
                text += "".join(VOCAB[t] for t in forced)
                break
            tid = guide.pick(text, shuffled(rng, EOS + 1))
            assert tid is not None, text
            if tid == EOS:
                break
            assert VOCAB[tid] and "\ufffd" not in VOCAB[tid]
            used.append(tid)
            text += VOCAB[tid]
        assert len(used) <= budget, (text, budget)
        assert c.complete(text), text
        check(schema, text)


def test_pick_mask_and_eos():
    c = JsonConstraint(ENUM)
    guide = TokenGuide(c, VOCAB, EOS)
    ids = {p: i for i, p in enumerate(VOCAB)}
    assert guide.pick("", [ids["["], ids[""], ids["{"]]) == ids["{"]
    assert guide.pick('{"color":', [ids["12"], ids['"']]) == ids["12"]
    assert guide.pick('{"color":', [ids["true"], ids["x"]]) is None
    mask = guide.allowed_mask('{"color":1')
    assert [VOCAB[i] for i, ok in enumerate(mask) if ok] == [",", "2", ',"']
    done = '{"color":1,"mode":"fast"}'
    assert guide.pick(done, [ids["}"], EOS]) == EOS
    assert guide.pick(done, [ids["}"]]) == EOS      # complete and nothing can follow: ending is the only choice
    assert guide.allowed_mask(done)[EOS] and not guide.allowed_mask('{"color":1')[EOS]
    # a recorded budget refuses tokens whose finish would no longer fit
    guide = TokenGuide(JsonConstraint({"type": "object", "properties": {"a": {"enum": ["x", "y" * 10]}}}), VOCAB, EOS)
    assert guide.pick('{"a":"', [ids["y"], ids["x"]]) == ids["y"]
    assert guide.forced('{"a":"', 6, encode) is None
    assert guide.pick('{"a":"', [ids["y"], ids["x"]]) == ids["x"]
    assert guide.forced('{"a":"', 3, encode) == [ids["x"], ids['"}']]
