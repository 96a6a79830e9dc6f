"""The ggml tensor types: names, block geometry, and row sizes (facts from the `gguf` package)."""

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGMLType = GGMLQuantizationType


def resolve_type(ggml_type) -> GGMLType:
    """Accept a GGMLType, its integer id, or its name in any case ("IQ1_S", "q4_k")."""
    if isinstance(ggml_type, GGMLType):
        return ggml_type
    if isinstance(ggml_type, str):
        try:
            return GGMLType[ggml_type.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type name {ggml_type!r}") from None
    try:
        return GGMLType(int(ggml_type))
    except ValueError:
        raise ValueError(f"unknown ggml type id {ggml_type!r}") from None


def block_info(ggml_type) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return GGML_QUANT_SIZES[resolve_type(ggml_type)]


def row_nbytes(ggml_type, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements; raises if the row is not a whole number of blocks."""
    elements, nbytes = block_info(ggml_type)
    if n_cols % elements:
        raise ValueError(f"{resolve_type(ggml_type).name} rows need a multiple of {elements} elements, got {n_cols}")
    return n_cols // elements * nbytes
