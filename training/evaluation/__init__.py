"""Evaluation of frozen features: linear probe and k-NN (``evaluate``), feature extraction for
every model kind (``features``), the probes themselves (``probe``). It reads models through
``training.model`` / ``training.hf`` / ``training.checkpoint`` and never imports the training loop
(``training.train``, ``training.partial_fc``, ``training.loss``): a test holds that direction."""
