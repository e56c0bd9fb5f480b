// The Java client anchor: the raw aio-pika phases with RabbitMQ's own Java client, to show what the
// broker does on this machine when the client costs next to nothing. Built by bench/envs.py (javac,
// against Debian's librabbitmq-client-java) and run through bench/systems/java.py, which speaks the
// adapters' protocol (bench/systems/lib/benchcommon.py):
//
//   Anchor produce --phase P --n N --queue Q --url URL --queue-type classic|quorum [--size B]
//   Anchor worker --queue Q --url URL --queue-type T [--tuned]     (until SIGTERM; $BENCH_COUNTER_DIR)
//   Anchor count --queue Q --url URL --queue-type T
//
// Messages as raw aio-pika sends them: persistent, mandatory, application/json, a message id, one
// header, to the default exchange, on a channel with publisher confirms; the queue is durable.

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.Envelope;
import java.io.FileOutputStream;
import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.ConcurrentNavigableMap;
import java.util.concurrent.ConcurrentSkipListMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.Semaphore;
import java.util.concurrent.atomic.AtomicInteger;

public final class Anchor {
    static final int CALLERS = 100; // publishes awaiting their confirm at once in enqueue_concurrent
    static final int BATCH = 1000; // publishes per confirm wait in enqueue_batched
    static final int PREFETCH_DEFAULT = 10;
    static final int PREFETCH_TUNED = 200;
    static final long CONFIRM_TIMEOUT_MS = 60_000;

    private Anchor() {}

    public static void main(String[] argv) throws Exception {
        if (argv.length == 0) {
            fail("usage: Anchor produce|worker|count --queue Q --url URL --queue-type classic|quorum ...");
        }
        Map<String, String> opts = new HashMap<>();
        for (int i = 1; i < argv.length; i++) {
            String key = argv[i].replaceFirst("^--", "");
            boolean flag = i + 1 >= argv.length || argv[i + 1].startsWith("--");
            opts.put(key, flag ? "true" : argv[++i]);
        }
        ConnectionFactory factory = new ConnectionFactory();
        factory.setUri(require(opts, "url"));
        String queue = require(opts, "queue");
        String type = opts.getOrDefault("queue-type", "classic");
        switch (argv[0]) {
            case "produce" -> produce(factory, queue, type, opts);
            case "worker" -> worker(factory, queue, type, opts.containsKey("tuned"));
            case "count" -> count(factory, queue);
            default -> fail("unknown command " + argv[0]);
        }
    }

    static String require(Map<String, String> opts, String key) {
        String value = opts.get(key);
        if (value == null) {
            fail("--" + key + " is required");
        }
        return value;
    }

    static void fail(String message) {
        System.err.println(message);
        System.exit(2);
    }

    static void declare(Channel channel, String queue, String type) throws IOException {
        Map<String, Object> arguments = new HashMap<>();
        if (type.equals("quorum")) {
            arguments.put("x-queue-type", "quorum");
        } else if (!type.equals("classic")) {
            fail("--queue-type must be classic or quorum");
        }
        channel.queueDeclare(queue, true, false, false, arguments);
    }

    static AMQP.BasicProperties properties() {
        return new AMQP.BasicProperties.Builder()
                .contentType("application/json")
                .deliveryMode(2)
                .messageId(UUID.randomUUID().toString().replace("-", ""))
                .headers(Map.of("x-attempt", 1))
                .build();
    }

    static void produce(ConnectionFactory factory, String queue, String type, Map<String, String> opts)
            throws Exception {
        String phase = require(opts, "phase");
        int n = Integer.parseInt(require(opts, "n"));
        int size = Integer.parseInt(opts.getOrDefault("size", "100"));
        byte[] body = ("{\"email\": \"a@b.c\", \"content\": \"" + "x".repeat(size) + "\"}")
                .getBytes(StandardCharsets.UTF_8);
        try (Connection connection = factory.newConnection("bench anchor")) {
            Channel channel = connection.createChannel();
            channel.confirmSelect();
            declare(channel, queue, type);
            AtomicInteger returned = new AtomicInteger();
            channel.addReturnListener(r -> returned.incrementAndGet());
            long cpu = cpuNanos();
            long started = System.nanoTime();
            switch (phase) {
                case "enqueue_sequential" -> {
                    for (int i = 0; i < n; i++) {
                        channel.basicPublish("", queue, true, properties(), body);
                        channel.waitForConfirmsOrDie(CONFIRM_TIMEOUT_MS);
                    }
                }
                case "enqueue_concurrent" -> windowed(channel, queue, body, n);
                case "enqueue_batched" -> {
                    for (int i = 0; i < n; i += BATCH) {
                        for (int j = i; j < Math.min(n, i + BATCH); j++) {
                            channel.basicPublish("", queue, true, properties(), body);
                        }
                        channel.waitForConfirmsOrDie(CONFIRM_TIMEOUT_MS);
                    }
                }
                default -> fail("unsupported phase " + phase + " (the anchor runs the enqueue and drain phases)");
            }
            double seconds = (System.nanoTime() - started) / 1e9;
            double cpuSeconds = (cpuNanos() - cpu) / 1e9;
            if (returned.get() > 0) {
                fail(returned.get() + " publishes were returned unroutable");
            }
            System.out.printf(
                    "{\"seconds\": %.6f, \"cpu_seconds\": %.6f, \"messages\": %d, \"peak_rss_mib\": %.2f, "
                            + "\"loop\": \"java %s\"}%n",
                    seconds, cpuSeconds, n, peakRssMib(), System.getProperty("java.version"));
        }
    }

    /** CALLERS publishes awaiting their confirm at any time: confirms handled as they come (pipelined). */
    static void windowed(Channel channel, String queue, byte[] body, int n) throws Exception {
        Semaphore window = new Semaphore(CALLERS);
        ConcurrentNavigableMap<Long, Boolean> outstanding = new ConcurrentSkipListMap<>();
        AtomicInteger nacked = new AtomicInteger();
        channel.addConfirmListener(
                (tag, multiple) -> settle(outstanding, window, tag, multiple),
                (tag, multiple) -> nacked.addAndGet(settle(outstanding, window, tag, multiple)));
        for (int i = 0; i < n; i++) {
            window.acquire();
            outstanding.put(channel.getNextPublishSeqNo(), Boolean.TRUE);
            channel.basicPublish("", queue, true, properties(), body);
        }
        channel.waitForConfirmsOrDie(CONFIRM_TIMEOUT_MS);
        if (nacked.get() > 0) {
            fail(nacked.get() + " publishes were nacked");
        }
    }

    static int settle(ConcurrentNavigableMap<Long, Boolean> outstanding, Semaphore window, long tag, boolean multiple) {
        int settled;
        if (multiple) {
            ConcurrentNavigableMap<Long, Boolean> head = outstanding.headMap(tag, true);
            settled = head.size();
            head.clear();
        } else {
            settled = outstanding.remove(tag) != null ? 1 : 0;
        }
        window.release(settled);
        return settled;
    }

    static void worker(ConnectionFactory factory, String queue, String type, boolean tuned) throws Exception {
        String folder = System.getenv("BENCH_COUNTER_DIR");
        FileOutputStream counter = folder == null
                ? null
                : new FileOutputStream(Path.of(folder, Long.toString(ProcessHandle.current().pid())).toFile(), true);
        Connection connection = factory.newConnection("bench anchor worker");
        Channel channel = connection.createChannel();
        channel.basicQos(tuned ? PREFETCH_TUNED : PREFETCH_DEFAULT);
        declare(channel, queue, type);
        channel.basicConsume(queue, false, new DefaultConsumer(channel) {
            @Override
            public void handleDelivery(String tag, Envelope envelope, AMQP.BasicProperties props, byte[] body)
                    throws IOException {
                if (counter != null) {
                    counter.write('.'); // one byte per task run, as the Python workers count
                }
                channel.basicAck(envelope.getDeliveryTag(), false);
            }
        });
        CountDownLatch forever = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                connection.close(5_000);
            } catch (IOException ignored) {
                // exiting anyway
            }
        }));
        forever.await();
    }

    static void count(ConnectionFactory factory, String queue) throws Exception {
        try (Connection connection = factory.newConnection("bench anchor count")) {
            int ready = connection.createChannel().queueDeclarePassive(queue).getMessageCount();
            System.out.printf("{\"messages\": %d}%n", ready);
        }
    }

    static long cpuNanos() {
        return ((com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean())
                .getProcessCpuTime();
    }

    static double peakRssMib() {
        try {
            for (String line : Files.readAllLines(Path.of("/proc/self/status"))) {
                if (line.startsWith("VmHWM:")) {
                    return Long.parseLong(line.replaceAll("[^0-9]", "")) / 1024.0;
                }
            }
        } catch (IOException | NumberFormatException ignored) {
            // not Linux: no figure
        }
        return 0.0;
    }
}
