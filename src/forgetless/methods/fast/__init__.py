"""What makes the merge rules fast at 7B, apart from the rules themselves (:mod:`forgetless.methods`): the exact
streamed top-k (:mod:`.select`), the fused C kernels and their wrapper (:mod:`.kernels`), and the in-place,
chunked forms of the baselines (:mod:`.baselines`). Each gives its rule's result bit for bit; the tests hold the
two side by side."""
