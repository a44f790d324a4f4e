"""The machinery pruning methods share: the method interface (``base``, ``context``), masks and N:M patterns,
target selection, the block-by-block weight-pruning orchestration, OWL's layerwise sparsities and block
reconstruction. Methods (``hf_prune.methods.<name>``) build on it; nothing here imports a method."""
