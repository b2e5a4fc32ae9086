"""Built-in decoding methods, one module each; importing this package registers them."""

from decoding.methods import beam, charwise, greedy, pool, speculative, tokenwise, unite  # noqa: F401
