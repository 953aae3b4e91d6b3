// edgepack Android sample: load the exported .tflite with the LiteRT Interpreter and run prefill + a greedy
// decode loop, everything read from model_info.json. Documentation-grade: not compiled by edgepack's tests.
// Gradle: implementation("com.google.ai.edge.litert:litert:1.4.0") and, so the model is memory-mapped from the
// APK instead of inflated, androidResources { noCompress += listOf("tflite", "ort") }.
// Tokenization is not shown: encode the prompt with tokenizer.json (and the chat template in
// tokenizer_config.json) using a Hugging Face tokenizers binding, e.g. ai.djl.huggingface:tokenizers.
package ai.edgepack

import android.content.Context
import org.json.JSONObject
import org.tensorflow.lite.Interpreter
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer
import java.nio.channels.FileChannel

class EdgepackLlm(context: Context, modelFile: String = "tflite/model_int4.tflite") {
    private val info = JSONObject(context.assets.open("model_info.json").bufferedReader().readText())
    private val layers = info.getInt("num_layers")
    private val kvHeads = info.getInt("num_kv_heads")
    private val headDim = info.getInt("head_dim")
    private val capacity = info.getInt("context_length")
    private val prefillLength = info.getInt("prefill_length")
    private val vocab = info.getInt("vocab_size")
    private val eos = info.getJSONArray("eos_token_ids").let { a -> (0 until a.length()).map { a.getInt(it) }.toSet() }
    // decode_<S> reads only the cache's first S slots: (S, name), smallest first; "decode" reads all of them
    private val decodeWindows = info.optJSONObject("decode_windows")?.let { w ->
        w.keys().asSequence().map { w.getInt(it) to it }.sortedBy { it.first }.toList()
    } ?: emptyList()

    private val interpreter = Interpreter(
        context.assets.openFd(modelFile).use { fd ->
            FileInputStream(fd.fileDescriptor).channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
        },
        Interpreter.Options().setNumThreads(Runtime.getRuntime().availableProcessors()),
    )

    // The cache the graph reads: one [1, kvHeads, capacity, headDim] float buffer per layer for keys and values.
    // The graph returns only this step's keys/values (k_new, v_new); we write them in at `length`.
    private fun cacheBuffer() = ByteBuffer.allocateDirect(4 * kvHeads * capacity * headDim).order(ByteOrder.nativeOrder())
    private val keys = List(layers) { cacheBuffer() }
    private val values = List(layers) { cacheBuffer() }
    private var length = 0

    private fun run(signature: String, tokens: IntArray, steps: Int, real: Int): FloatArray {
        val inputs = HashMap<String, Any>()
        inputs["tokens"] = arrayOf(tokens.copyOf(steps))  // [1, steps], padded with 0
        inputs["position"] = intArrayOf(length)
        if (signature == "prefill") inputs["length"] = intArrayOf(real)
        for (l in 0 until layers) { inputs["k_$l"] = keys[l].rewind(); inputs["v_$l"] = values[l].rewind() }
        val logits = arrayOf(FloatArray(vocab))
        val slice = layers * kvHeads * steps * headDim
        val kNew = FloatBuffer.allocate(slice)
        val vNew = FloatBuffer.allocate(slice)
        interpreter.runSignature(inputs, mapOf("logits" to logits, "k_new" to kNew, "v_new" to vNew), signature)
        store(kNew, keys, steps, real)
        store(vNew, values, steps, real)
        length += real
        return logits[0]
    }

    // k_new is [layers, 1, kvHeads, steps, headDim]; cache slot s of head h starts at ((h * capacity) + s) * headDim.
    private fun store(new: FloatBuffer, cache: List<ByteBuffer>, steps: Int, real: Int) {
        for (l in 0 until layers) for (h in 0 until kvHeads) for (t in 0 until real) {
            val src = ((l * kvHeads + h) * steps + t) * headDim
            val dst = ((h * capacity) + length + t) * headDim * 4
            for (d in 0 until headDim) cache[l].putFloat(dst + 4 * d, new.get(src + d))
        }
    }

    /** Greedy generation from prompt token ids (already chat-templated); returns the generated ids. */
    fun generate(prompt: IntArray, maxNewTokens: Int = 128): List<Int> {
        require(prompt.size + maxNewTokens <= capacity) { "prompt + answer exceed the context length $capacity" }
        length = 0
        var logits = FloatArray(0)
        for (start in prompt.indices step prefillLength) {  // chunked prefill
            val chunk = prompt.copyOfRange(start, minOf(start + prefillLength, prompt.size))
            logits = run("prefill", chunk, prefillLength, chunk.size)
        }
        val out = ArrayList<Int>()
        repeat(maxNewTokens) {
            val next = logits.indices.maxByOrNull { logits[it] }!!
            out.add(next)
            if (next in eos) return out
            val signature = decodeWindows.firstOrNull { length <= it.first }?.second ?: "decode"  // grows with the chat
            logits = run(signature, intArrayOf(next), 1, 1)
        }
        return out
    }
}
