"""The bundled digits model (:class:`olss_fast.models.digits.DigitsPipeline`): a class-conditional pixel-space
UNet2DModel, class labels as ``prompt``, the null class as the unconditional half."""
from __future__ import annotations

from typing import Any

import torch

from olss_fast.models import digits as d
from olss_fast.models.digits import NULL_CLASS, DigitsPipeline
from olss_fast.pipelines.base import CondInput, ExportSpec, PipelineAdapter, Prepared, repeat_each


class DigitsUNet(torch.nn.Module):
    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=cond, return_dict=False)[0]


class DigitsDecoder(torch.nn.Module):
    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # as DigitsAdapter.decode
        return (latents.float() / 2 + 0.5).clamp(0, 1)


class DigitsAdapter(PipelineAdapter):
    name = "DigitsPipeline"
    extra_kwargs = ("class_labels",)
    export_unsupported = None

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return isinstance(pipe, DigitsPipeline)

    def _size(self) -> int:
        return int(self.denoiser.config.sample_size)

    def default_size(self) -> tuple[int, int]:
        return self._size(), self._size()

    def check_size(self, height: int, width: int) -> None:
        if (height, width) != self.default_size():
            raise ValueError(f"the digits model samples {self._size()}x{self._size()} images, got {height}x{width}")

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.latent_channels, self._size(), self._size())

    def prepare(self, args, guided, num_images, text_in_graph, height, width, options):  # type: ignore[override]
        prompt, labels_kw = args.get("prompt"), args.get("class_labels")
        if args.get("prompt_embeds") is not None or args.get("negative_prompt_embeds") is not None:
            raise ValueError("the digits pipeline is class-conditional: pass class labels as `prompt`, not embeddings")
        if prompt is not None and labels_kw is not None:
            raise ValueError("pass the digits as `prompt` or as `class_labels`, not both")
        prompt = prompt if prompt is not None else labels_kw
        labels = list(range(d.NUM_DIGITS)) if prompt is None else d.parse_class_labels(prompt, "prompt")
        labels = repeat_each(labels, num_images)
        batch = len(labels)
        negative = args.get("negative_prompt")
        if negative is None:
            neg = [d.NULL_CLASS] * batch
        else:
            neg = d.parse_class_labels(negative, "negative_prompt")
            if len(neg) == 1:
                neg = neg * batch
            elif len(neg) * num_images == batch:
                neg = repeat_each(neg, num_images)
            else:
                raise ValueError(
                    f"batch size mismatch: negative_prompt has {len(neg)} labels but prompt has {batch // num_images}"
                )
        ids = torch.tensor((neg + labels) if guided else labels, dtype=torch.long, device=self.device)
        return Prepared(batch, "labels", {"labels": ids})

    def placeholder_args(self, batch: int) -> dict[str, Any]:
        return {"prompt": [0] * batch}

    def encode(self, inputs, mode, guided, options):  # type: ignore[override]
        return {"class_labels": inputs["labels"]}

    def decode(self, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def finish(self, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
        from diffusers import ImagePipelineOutput

        if output_type in ("latent", "pt"):
            images: Any = image
        else:
            arr = image.cpu().permute(0, 2, 3, 1).numpy()
            images = arr if output_type == "np" else self.pipe.numpy_to_pil_gray(arr)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def export_spec(self, batch: int, height: int, width: int, guided: bool, args: Any = None,
                    example: Any = None) -> ExportSpec:
        m = 2 * batch if guided else batch
        return ExportSpec(
            denoiser=DigitsUNet(self.denoiser), decoder=DigitsDecoder(),
            cond=[CondInput("class_labels", "labels", (m,), "int64")], uncond=int(NULL_CLASS), id_input="class_labels",
            id_limit=int(self.denoiser.config.num_class_embeds or NULL_CLASS + 1), image_range="[0,1]",
            modules={"unet": self.denoiser},
        )
