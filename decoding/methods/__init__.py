"""Built-in decoding methods, one module each; importing this package registers them."""

from decoding.methods import beam, charwise, greedy, speculative, tokenwise, unite  # noqa: F401
