"""The stock lm-eval CLI with the ``vllm_bf`` (budget forcing) model registered.

    python -m evals.lmeval run --model vllm_bf --model_args pretrained=CKPT,bf_wait=1,bf_thinking_tokens=32000,... \\
        --tasks aime24_iwsft --include_path evals/ --apply_chat_template --log_samples --output_path results/

Everything else is lm-eval's own command line (``lm-eval run --help``).
"""

import sys


def main() -> int:
    from evals.budget import register

    register()
    from lm_eval.__main__ import cli_evaluate

    return cli_evaluate() or 0


if __name__ == "__main__":
    sys.exit(main())
