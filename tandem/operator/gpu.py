"""How Kubernetes spells GPUs (NVIDIA's device plugin and GPU feature discovery)."""

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
#: NVIDIA's device plugin taints GPU nodes; pods that ask for GPUs tolerate it.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
