"""The local layer repository of Hugging Face's ``kernels`` package that offers lightllm's layers
(``lightllm.integrations.kernel_hub`` maps transformers' layer names to them). ``kernels`` reads
metadata.json beside this file and runs this file under the id it names; the layers it looks up
are the attributes of ``layers``."""

from lightllm.integrations import kernel_hub as layers  # noqa: F401
