// Photos are downscaled in the browser before upload: a tablet camera's 12 MP frame
// costs seconds to send and decode, while the vision encoders use far fewer pixels
// (SmolVLM 512 px tiles, Qwen2-VL's default budget about 1 MP). Smaller photos are
// sent as they are.

export const MAX_SIDE = 1024;

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// A data: URL for the photo, at most MAX_SIDE pixels on its longer side.
export async function photoDataURL(file) {
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const { width: w, height: h } = bitmap;
  const scale = Math.min(1, MAX_SIDE / Math.max(w, h));
  if (scale === 1) {
    bitmap.close();
    return { url: await readAsDataURL(file), width: w, height: h };
  }
  const width = Math.round(w * scale);
  const height = Math.round(h * scale);
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0, width, height);
  bitmap.close();
  return { url: canvas.toDataURL("image/jpeg", 0.9), width, height };
}
