"""HF <-> Megatron checkpoint mappings, conversion, upscaling, averaging and merging.

Modules, lowest first (none imports the training loop; the training loop imports ``dcp_io``):

* ``hf_io``: safetensors reading and streaming writing, atomic output folders;
* ``dcp_io``: dist checkpoint reading and lazy writing, iteration folders, ``apriel_model.yaml``;
* ``table``: the shape of a name table and what every family derives from it;
* ``mistral``, ``llava``: one driver per model family (HF config mapping, table, loader, TP rules);
* ``convert``: the one conversion loop, both directions, either family; ``upscale``, ``average``.
"""
