"""A rank function that builds a Megatron-LM GPT model from Megatron-LM's own parsed arguments, on CPU.

Kept apart from the test modules because it must put the Megatron-LM tree on ``sys.path`` before
anything imports ``megatron`` (the tree's ``megatron/core`` is then the megatron-core in use, as in a
real Megatron-LM run); the test modules import the installed megatron-core at the top.
"""
import importlib.util
import sys


def megatron_lm_model(rank, world, tree, route, argv, example_path):
    """Parse ``argv`` with Megatron-LM's parser (plus the example's options for ``route="example"``),
    validate it, and build the GPT model the way ``route`` does: ``"example"`` through
    ``examples/megatron/pretrain_gpt_base.py``'s builder, ``"patch"`` the way the patched
    ``pretrain_gpt.py`` does (core_v0.19.0: its model config's builder; core_v0.16.1: ``gpt_builder``).
    Returns the class names of the MoE routers and the megatron-core version. Megatron-LM's
    ``pretrain()`` stops earlier on CPU (``initialize_megatron`` asserts CUDA); building the model from
    the parsed arguments is the part of a run that decides which routers it has."""
    from megatron_cpu import cuda_calls_on_cpu, typing_override_for_python311

    typing_override_for_python311()
    sys.path.insert(0, tree)
    import megatron.core
    assert megatron.core.__file__.startswith(tree), megatron.core.__file__
    from megatron.core import parallel_state as ps
    from megatron.training import arguments
    from megatron.training.global_vars import set_args

    from base_plugin.megatron import check_base_routers
    from base_plugin.megatron.compat import default_pg_collection

    example = None
    if route == "example":
        spec = importlib.util.spec_from_file_location("pretrain_gpt_base", example_path)
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
    sys.argv = ["pretrain_gpt.py"] + list(argv)
    args = arguments.parse_args(extra_args_provider=example.add_base_args if example else None)
    arguments.validate_args(args, {})
    args.padded_vocab_size = args.vocab_size  # what Megatron-LM's tokenizer setup would set
    set_args(args)
    ps.initialize_model_parallel()
    with cuda_calls_on_cpu():  # the alltoall dispatcher makes a torch.cuda.Stream at construction
        if example is not None:
            model = example.base_gpt_builder(args, True, True)
        elif hasattr(arguments, "parse_and_validate_args"):  # core_v0.19.0
            from megatron.training.argument_utils import gpt_config_from_args
            from megatron.training.models.gpt import GPTModelBuilder

            model = GPTModelBuilder(gpt_config_from_args(args)).build_model(default_pg_collection())
        else:  # core_v0.16.1
            import gpt_builders

            model = gpt_builders.gpt_builder(args, True, True)
    return [type(r).__name__ for r in check_base_routers(model)], megatron.core.__version__
