"""Readers of the released weights of the official code bases, each converting a file in memory into a
full/ export dict (full.config.export_dict) without running anything from it:

    guided_diffusion  openai/consistency_models' .pt files (raw guided-diffusion state dicts, ADM)
    edm_pickle        NVlabs/edm's .pkl snapshots, read by a restricted unpickler (NCSN++ / DDPM++)
    flax              openai/consistency_models_cifar10's Flax checkpoints, read with msgpack alone

full/checkpoints.py tries them in turn (checkpoints.import_official)."""
