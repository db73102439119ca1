"""A GBNF grammar through llama.cpp's grammar sampler (`llama_sampler_init_grammar`).

`grammar_sampler` builds the native sampler a sequence's TokenSampler applies before its chain
(runtime/sampler.py owns and frees it); `check_grammar` parses one and frees it at once, so a caller
can refuse a grammar llama.cpp cannot parse before any sequence needs it.
"""

from __future__ import annotations

import llama_cpp


def grammar_sampler(model, grammar: str, root: str = "root"):
    """A new llama.cpp grammar sampler for `model`'s vocabulary (the caller frees it); ValueError if it
    does not parse."""
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), root.encode("utf-8"))
    if not sampler:
        raise ValueError("the grammar does not parse (llama.cpp's log says where)")
    return sampler


def check_grammar(model, grammar: str) -> None:
    """ValueError if llama.cpp cannot parse `grammar` for this model."""
    llama_cpp.llama_sampler_free(grammar_sampler(model, grammar))
